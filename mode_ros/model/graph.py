"""Whole-chunk CUDA graph: image preprocessing, both FiLM-ResNets, the cached 10-step DDIM loop.

The routing table makes the sampler a fixed sequence of kernels (no host syncs, no data-dependent
shapes), so it can be captured once and replayed. Inputs are copied into static buffers in place.
Falls back (raises ``GraphUnavailable`` with the reason) on CPU; callers log it and stay eager.
"""
from __future__ import annotations

import torch


class GraphUnavailable(RuntimeError):
    pass


class ChunkGraph:
    def __init__(self, policy, batch: int = 1, warmup: int = 3):
        if policy.device.type != "cuda":
            raise GraphUnavailable(f"CUDA graphs need a CUDA device (policy is on {policy.device})")
        self.policy, self.batch = policy, batch
        cfg = policy.config
        dev = policy.device
        policy.sampler.ensure()
        from .encoders import imagenet_mean_std
        imagenet_mean_std(dev)
        self.key = policy.sampler.table.key
        h, w = cfg.vision.image_size
        self.images = (torch.zeros(batch, cfg.n_cameras, 3, h, w, dtype=torch.uint8, device=dev)
                       if cfg.n_cameras else None)
        self.goal = torch.zeros(batch, 512, device=dev)
        self.state = torch.zeros(batch, cfg.state_dim, device=dev) if cfg.state_dim else None
        self.noise = torch.zeros(batch, cfg.chunk_size, cfg.action_dim, device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    def _run(self):
        return self.policy.sample_normalized(self.images, self.goal, self.state, self.noise, cached=True)

    def __call__(self, images, goal, state, noise):
        if self.policy.sampler.key() != self.key:
            raise GraphUnavailable("weights or schedule changed since capture: rebuild the graph")
        if goal.shape[0] != self.batch:
            raise GraphUnavailable(f"graph captured for batch {self.batch}, got {goal.shape[0]}")
        if self.images is not None:
            self.images.copy_(images, non_blocking=True)
        self.goal.copy_(goal, non_blocking=True)
        if self.state is not None:
            self.state.copy_(state, non_blocking=True)
        self.noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.out


def enable_graph(policy, batch: int = 1, logger=None) -> bool:
    """Capture the chunk graph for ``policy``; on failure log why and keep the eager path."""
    try:
        policy.chunk_graph = ChunkGraph(policy, batch)
        return True
    except Exception as exc:  # noqa: BLE001 - any capture failure must fall back to eager
        policy.chunk_graph = None
        if logger is not None:
            logger.warning("CUDA graph capture unavailable, staying eager: %s", exc)
        return False
