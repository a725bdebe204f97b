"""Expert caching: the routing of every sampling step is fixed before inference.

Routing depends on sigma alone, and sigma_i is fixed per step index, so for a given (weights,
schedule, dtype, device) we compute once:
  * c_i = noise embedding of sigma_i, (S, 1, d), shared by the noise token, the attention
    conditioning and (formerly) the router;
  * a routing table R[i, l] = (e1, e2, g1, g2) — indices as Python ints (the loop is unrolled over
    them, so there is no lookup by float key and no host sync while sampling) and the gates as a
    device tensor;
  * the EDM scalings and DDIM ratios per step.
The sampler then runs only the two selected experts per layer as views of the stacked expert
weights (no copies), so the whole 10-step loop is a fixed graph that CUDA graphs / torch.compile
can capture. The cache is rebuilt automatically when the router/sigma weights change (in-place
version counters), or the dtype, device or schedule change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import EDMPrecond, MoDEDenoiser
from .sampling import ddim_loop, edm_denoise


@dataclass
class RoutingTable:
    sigmas: torch.Tensor          # (S+1,) with the trailing 0, float32 on the device
    noise_emb: torch.Tensor       # (S, 1, 1, d) in the model dtype
    indices: list                 # [S][L] -> tuple of k ints
    indices_t: torch.Tensor       # (S, L, k) int64 (for reports / plots)
    gates: torch.Tensor           # (S, L, k) in the model dtype, on the device
    probs: torch.Tensor           # (S, L, E) float32
    c_skip: torch.Tensor          # (S,)
    c_out: torch.Tensor
    c_in: torch.Tensor
    ratio: torch.Tensor           # (S,) sigma_{i+1}/sigma_i
    key: tuple

    def distinct_pairs(self) -> list[int]:
        """Number of distinct expert sets per layer over the schedule."""
        n_layers = len(self.indices[0])
        return [len({tuple(sorted(self.indices[s][l])) for s in range(len(self.indices))}) for l in range(n_layers)]

    def selections(self, i: int) -> list:
        """Step i's routing as ``MoDEDenoiser.body`` takes it: per layer (expert ints, gates (k,))."""
        return [(sel, self.gates[i, l]) for l, sel in enumerate(self.indices[i])]

    def usage(self, num_experts: int) -> torch.Tensor:
        """(S, L, E) gate mass per step, layer and expert (0 for unselected): the Fig. 6 heat map."""
        S, L, _ = self.indices_t.shape
        out = torch.zeros(S, L, num_experts)
        return out.scatter(-1, self.indices_t.cpu(), self.gates.float().cpu())


def _weights_key(net: MoDEDenoiser) -> tuple:
    params = [net.sigma_emb.weight, net.sigma_emb.bias, net.sigma_linear.weight]
    for blk in net.blocks:
        params += [blk.router.fc1.weight, blk.router.fc1.bias, blk.router.fc2.weight, blk.router.fc2.bias]
    return tuple((p.data_ptr(), p._version) for p in params) + (params[0].dtype, params[0].device)


class CachedSampler:
    """Sync-free DDIM sampling with a precomputed routing table."""

    def __init__(self, net: MoDEDenoiser, precond: EDMPrecond, sigmas: torch.Tensor):
        self.net, self.precond = net, precond
        self._sigmas_cpu = sigmas.detach().to("cpu", torch.float64)
        self.table: RoutingTable | None = None
        self._epoch = 0   # bumped by invalidate(): weights changed in a way the key cannot see

    def invalidate(self) -> None:
        """Forget the routing table (and, through the key, every fused copy and captured graph built
        from it). Needed after writing weights in place without autograd's version counter
        (``p.data.copy_``); ``load_state_dict`` does it by itself (a hook of the policy)."""
        self._epoch += 1
        self.table = None

    def set_schedule(self, sigmas: torch.Tensor) -> None:
        self._sigmas_cpu = sigmas.detach().to("cpu", torch.float64)
        self.table = None

    def schedule(self) -> torch.Tensor:
        """The sigma schedule (S + 1,) float32 with the trailing 0 (what the table's ``sigmas`` hold), on
        the CPU; needs no weights."""
        return self._sigmas_cpu.to(torch.float32)

    def key(self) -> tuple:
        return _weights_key(self.net) + (tuple(self._sigmas_cpu.tolist()), self._epoch)

    @torch.no_grad()
    def build(self) -> RoutingTable:
        net = self.net
        p = net.sigma_emb.weight
        dev, dt = p.device, p.dtype
        sig64 = self._sigmas_cpu
        sig = sig64.to(dev, torch.float32)
        steps = sig[:-1]
        # the model's one routing function, in float32: the same routing whatever the model dtype
        idx, gates, probs, c = net.routing(steps, torch.float32, with_embedding=True)
        c_skip, c_out, c_in = self.precond.scalings(steps)
        ratio = sig[1:] / sig[:-1]
        idx_cpu = idx.cpu()                                  # the one sync, at build time
        table = RoutingTable(
            sigmas=sig, noise_emb=c.unsqueeze(1).to(dt), indices=[[tuple(r) for r in s] for s in idx_cpu.tolist()],
            indices_t=idx_cpu, gates=gates.to(dt), probs=probs.float(),
            c_skip=c_skip, c_out=c_out, c_in=c_in, ratio=ratio, key=self.key())
        self.table = table
        return table

    def ensure(self) -> RoutingTable:
        if self.table is None or self.table.key != self.key():
            self.build()
        return self.table

    def denoise_step(self, i: int, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """D(x; sigma_i) with cached routing: ``edm_denoise`` around ``MoDEDenoiser.body`` with step i's
        table row (noise embedding, expert selection, scalings). ctx: embedded context tokens (B, Tc, d).
        Differentiable in x (no in-place ops): real-time chunking's guidance takes its VJP."""
        net, t = self.net, self.table
        c = t.noise_emb[i].expand(x.shape[0], 1, -1)
        sel = t.selections(i)
        return edm_denoise(x, lambda a_in: net.body(c, ctx, a_in.to(ctx.dtype), selections=sel)[0].float(),
                           t.c_in[i], t.c_skip[i], t.c_out[i])

    def sample(self, x_T: torch.Tensor, goal: torch.Tensor, obs=None, state=None,
               return_trajectory: bool = False, guide=None):
        """x_T: (B, K, A) float32 = sigma_max * N(0, I). Everything stays on the device. Public API of
        the cached chunk (the ONNX export traces it through ``MoDEPolicy.sample_normalized``).
        guide: real-time chunking's per-step correction (see ``sampling.ddim_loop``)."""
        t = self.ensure()
        ctx = self.net.context_tokens(goal, obs, state)
        return ddim_loop(lambda i, x: self.denoise_step(i, x, ctx), x_T, t.ratio, guide=guide,
                         return_trajectory=return_trajectory)
