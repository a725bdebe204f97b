"""The MoDE denoiser (reference ``MoDeDiT``) and its EDM preconditioning wrapper (``GCDenoiser``).

Token layout (T = 1 + goal_seq_len + n_cameras·obs_seq_len [+1 state] + chunk_size):
    [noise token c, goal, camera tokens…, (state token), a_0 … a_{K-1}]
Positional rows follow the reference: goal rows [0, G), the camera tokens of frame t share row G+t,
and the actions take rows G+O-1 … (so a_0 shares the row of the last camera frame). The noise token
has no positional embedding. Attention is plain causal over the whole sequence.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .blocks import CausalSelfAttention, RMSNorm
from .config import DenoiserConfig
from .moe import NoiseRouter, SwiGLUExperts, dense_gates, load_balance_loss
from .sampling import edm_denoise


class MoDEBlock(nn.Module):
    """X += Attn(RMS1(X) + c);  Y = RMS2(X);  X_out = Y + MoE(Y)   (residual="reference")."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        self.ln_1 = RMSNorm(d, cfg.norm_eps)
        self.attn = CausalSelfAttention(d, cfg.n_heads, cfg.attn_pdrop, cfg.norm_eps)
        self.ln_2 = RMSNorm(d, cfg.norm_eps)
        self.router = NoiseRouter(d, cfg.num_experts, cfg.router_temperature)
        self.moe = SwiGLUExperts(d, cfg.num_experts, cfg.mlp_ratio * d, cfg.mlp_pdrop)

    def attend(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln_1(x) + c)

    def residual(self, h: torch.Tensor, y: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        return (y if self.cfg.residual == "reference" else h) + moe_out

    def route(self, c: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(B, T, E) gate matrix: sampled per token row in training, deterministic top-k otherwise
        (``NoiseRouter.route``; the router input is the same for every token)."""
        idx, g, _ = self.router.route(c[:, 0], self.cfg.top_k, rows=n_tokens if self.training else None)
        gates = dense_gates(idx, g, self.cfg.num_experts)
        return gates if self.training else gates.unsqueeze(1).expand(-1, n_tokens, -1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mode: str = "dense", selection=None):
        """mode "dense": all experts masked by the gates (training and exact batched eval; no syncs).
        mode "sync": reference-like eval — only the experts selected by some sample are run (this reads
        the selection on the host, one sync per layer, like the reference's uncached path).
        selection (experts as Python ints, gates (k,)): a routing fixed beforehand (the cached
        sampler's table): only those experts run, as views of the stacked weights; returns gates None."""
        h = self.attend(x, c)
        y = self.ln_2(h)
        if selection is not None:
            return self.residual(h, y, self.moe.forward_selected(y, *selection)), None
        gates = self.route(c, y.shape[1])
        if mode == "sync" and not self.training:
            g = gates[:, 0]  # (B, E), equal for all tokens
            used = torch.nonzero(g.amax(dim=0) > 0).flatten().tolist()  # host sync (reference-like)
            out = self.moe.forward_selected(y, used, [g[:, e].view(-1, 1, 1) for e in used])
        else:
            out = self.moe.forward_dense(y, gates)
        return self.residual(h, y, out), gates


class MoDEDenoiser(nn.Module):
    """F_theta(c_in·x; sigma, goal, camera tokens[, state]) -> (B, K, A). Raw EDM sigma as input."""

    def __init__(self, cfg: DenoiserConfig, action_dim: int, chunk_size: int, n_cameras: int,
                 state_dim: int = 0):
        super().__init__()
        d = cfg.embed_dim
        self.cfg, self.action_dim, self.chunk_size = cfg, action_dim, chunk_size
        self.n_cameras, self.state_dim = n_cameras, state_dim
        self.sigma_emb = nn.Linear(1, d)
        self.sigma_linear = nn.Linear(d, d, bias=False)
        self.goal_emb = nn.Linear(cfg.goal_dim, d, bias=False)
        self.tok_emb = nn.Linear(cfg.obs_dim, d, bias=False) if n_cameras > 0 else None
        self.gripper_embed = nn.Linear(cfg.obs_dim, d, bias=False) if cfg.keep_gripper_embed else None
        self.state_emb = nn.Linear(state_dim, d, bias=False) if state_dim > 0 else None
        self.action_emb = nn.Linear(action_dim, d, bias=False)
        n_pos = cfg.goal_seq_len + cfg.obs_seq_len - 1 + chunk_size
        self.pos_emb = nn.Parameter(torch.zeros(1, n_pos, d))
        self.blocks = nn.ModuleList([MoDEBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln = RMSNorm(d, cfg.norm_eps)
        self.out = nn.Linear(d, action_dim)

    # ---- pieces shared by the plain forward and the cached sampler ---------------------------
    @property
    def n_tokens(self) -> int:
        return 1 + self.cfg.goal_seq_len + self.n_cameras * self.cfg.obs_seq_len + (self.state_dim > 0) + self.chunk_size

    def noise_embedding(self, sigma: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """c(sigma) = W2 (W1 (ln sigma / 4) + b1), shape (B, 1, d). Affine in ln sigma. dtype: compute
        in this dtype (float32 routing tables of a bf16 model) without copying the module."""
        dt = self.sigma_emb.weight.dtype if dtype is None else dtype
        s = (sigma.reshape(-1, 1, 1).log() / 4).to(dt)
        w1, b1, w2 = (p.to(dt) for p in (self.sigma_emb.weight, self.sigma_emb.bias, self.sigma_linear.weight))
        return F.linear(F.linear(s, w1, b1), w2)

    def context_tokens(self, goal: torch.Tensor, obs: torch.Tensor | None, state: torch.Tensor | None,
                       goal_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded [goal, cameras…, (state)] tokens with positions: (B, G + C·O (+1), d).
        goal: (B, G, goal_dim); obs: (B, O·C, obs_dim) frame-major (frame t: cameras in order)."""
        cfg = self.cfg
        if goal.dim() == 2:
            goal = goal.unsqueeze(1)
        if goal_mask is not None:
            goal = goal * goal_mask
        P = self.pos_emb
        parts = [self.goal_emb(goal) + P[:, : cfg.goal_seq_len]]
        if self.n_cameras:
            tok = self.tok_emb(obs)
            rows = P[:, cfg.goal_seq_len: cfg.goal_seq_len + cfg.obs_seq_len]
            rows = rows.repeat_interleave(self.n_cameras, dim=1)
            parts.append(tok + rows)
        if self.state_emb is not None:
            if state is None:
                raise ValueError("this model needs a proprioceptive state (state_dim > 0)")
            parts.append(self.state_emb(state.reshape(state.shape[0], 1, -1))
                         + P[:, cfg.goal_seq_len + cfg.obs_seq_len - 1: cfg.goal_seq_len + cfg.obs_seq_len])
        return torch.cat(parts, dim=1)

    def action_tokens(self, a_in: torch.Tensor) -> torch.Tensor:
        start = self.cfg.goal_seq_len + self.cfg.obs_seq_len - 1
        return self.action_emb(a_in) + self.pos_emb[:, start: start + self.chunk_size]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x[:, -self.chunk_size:]))

    def body(self, c: torch.Tensor, ctx: torch.Tensor, a_in: torch.Tensor, mode: str = "dense",
             selections=None):
        """THE network of one denoising step: tokens [c, ctx, action tokens of a_in] through every block,
        the head on the action rows. c: (B, 1, d) noise embedding, ctx: ``context_tokens``, a_in: the
        c_in-scaled noisy actions (B, K, A). selections: per layer (experts, gates) fixed beforehand
        (the cached sampler), else each block routes (``mode``). Returns (F (B, K, A), per-layer gates)."""
        x = torch.cat([c, ctx, self.action_tokens(a_in)], dim=1)
        all_gates = []
        for l, blk in enumerate(self.blocks):
            x, gates = blk(x, c, mode, None if selections is None else selections[l])
            all_gates.append(gates)
        return self.head(x), all_gates

    # ---- plain forward ------------------------------------------------------------------------
    def forward(self, a_in: torch.Tensor, sigma: torch.Tensor, goal: torch.Tensor,
                obs: torch.Tensor | None = None, state: torch.Tensor | None = None,
                mode: str = "dense", return_aux: bool = False):
        """a_in: c_in-scaled noisy actions (B, K, A); sigma: (B,) or scalar raw noise level."""
        b = a_in.shape[0]
        sigma = torch.as_tensor(sigma, device=a_in.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(b)
        c = self.noise_embedding(sigma)
        goal_mask = None
        if self.training and self.cfg.goal_drop > 0:
            g = goal if goal.dim() == 3 else goal.unsqueeze(1)
            goal_mask = torch.bernoulli(torch.full_like(g, 1 - self.cfg.goal_drop))
        f, gates = self.body(c, self.context_tokens(goal, obs, state, goal_mask), a_in, mode)
        if return_aux:
            lb = [load_balance_loss(g, self.cfg.num_experts) for g in gates]
            return f, {"load_balance": torch.stack(lb).mean(), "gates": torch.stack([g[:, 0] for g in gates], 1)}
        return f

    def routing(self, sigma: torch.Tensor, dtype: torch.dtype | None = None, with_embedding: bool = False):
        """Inference routing for given sigmas (``NoiseRouter.route`` per layer): indices (S, L, k),
        gates (S, L, k), probs (S, L, E) [, the noise embeddings (S, 1, d) if ``with_embedding``].
        dtype: compute in this dtype (the cached sampler routes in float32 whatever the model dtype)."""
        c = self.noise_embedding(sigma.reshape(-1), dtype)
        routes = [blk.router.route(c[:, 0], self.cfg.top_k, dtype=dtype) for blk in self.blocks]
        idx, gates, probs = (torch.stack(r, dim=1) for r in zip(*routes))
        return (idx, gates, probs, c) if with_embedding else (idx, gates, probs)


class EDMPrecond:
    """EDM scalings for sigma_data: D(x; sigma) = c_skip x + c_out F(c_in x; sigma)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def clean_input(self, a: torch.Tensor, sigma) -> torch.Tensor:
        """x with c_in(sigma)·x = a: how a clean (given) row enters the network unchanged, in training
        (``loss`` with prefix rows) and in sampling (``inpainting.PrefixGuide`` of a prefix-trained model)."""
        return a / self.scalings(torch.as_tensor(sigma, dtype=a.dtype, device=a.device))[2]

    def denoise(self, net: MoDEDenoiser, x: torch.Tensor, sigma: torch.Tensor, goal, obs=None, state=None,
                mode: str = "dense") -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (s.view(-1, 1, 1) for s in self.scalings(sigma))
        return edm_denoise(x, lambda a_in: net(a_in, sigma, goal, obs, state, mode=mode), c_in, c_skip, c_out)

    def loss(self, net: MoDEDenoiser, actions: torch.Tensor, sigma: torch.Tensor, goal, obs=None,
             state=None, noise: torch.Tensor | None = None, weight: torch.Tensor | None = None,
             prefix_rows: torch.Tensor | None = None):
        """EDM loss in F-space: mean((F(c_in x) - (a - c_skip x)/c_out)^2). Returns (loss, aux).
        prefix_rows (B,) ints: training-time prefix conditioning — the first rows of sample b are given
        clean (the network reads them as they are) and carry no loss."""
        noise = torch.randn_like(actions) if noise is None else noise
        x = actions + sigma.view(-1, 1, 1) * noise
        if prefix_rows is not None:
            given = torch.arange(actions.shape[1], device=actions.device) < prefix_rows.to(actions.device).view(-1, 1)
            x = torch.where(given.unsqueeze(-1), self.clean_input(actions, sigma.view(-1, 1, 1)), x)
            free = (~given).to(actions.dtype)
            weight = free if weight is None else weight * free
        c_skip, c_out, c_in = (s.view(-1, 1, 1) for s in self.scalings(sigma))
        target = (actions - c_skip * x) / c_out
        f, aux = net(x * c_in, sigma, goal, obs, state, return_aux=True)
        err = (f.float() - target) ** 2
        if weight is not None:  # (B, K) mask of valid (non-padding) steps
            w = weight.unsqueeze(-1).to(err.dtype)
            loss = (err * w).sum() / (w.sum() * err.shape[-1]).clamp_min(1)
        else:
            loss = err.mean()
        return loss, aux


def count_matmul_flops(net: MoDEDenoiser, batch: int = 1, cached: bool = True, dense: bool = False) -> dict:
    """Matmul FLOPs (2·M·N·K) of one denoiser call, analytically, broken down by part."""
    cfg, T, d = net.cfg, net.n_tokens, net.cfg.embed_dim
    H = cfg.mlp_ratio * d
    L = cfg.n_layers
    k = cfg.num_experts if dense else cfg.top_k
    attn_proj = L * 4 * 2 * T * d * d
    attn_core = L * 2 * 2 * T * T * d  # QK^T and AV (no causal saving)
    experts = L * k * (2 * T * d * 2 * H + 2 * T * H * d)
    router = 0 if cached else L * (2 * d * 2 * d + 2 * 2 * d * cfg.num_experts)
    n_obs = net.n_cameras * cfg.obs_seq_len
    emb = 2 * d * (cfg.goal_dim * cfg.goal_seq_len + cfg.obs_dim * n_obs + net.chunk_size * net.action_dim
                   + net.state_dim) + 2 * net.chunk_size * d * net.action_dim
    noise = 0 if cached else 2 * d * d
    parts = {"attention_proj": attn_proj, "attention_scores": attn_core, "experts": experts,
             "router": router, "embeddings_head": emb + noise}
    parts = {kk: v * batch for kk, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
