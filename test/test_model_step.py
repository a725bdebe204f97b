"""One routing function and one denoising step (issue 20 item 4): every path derives from
NoiseRouter.route, MoDEDenoiser.body, sampling.edm_denoise and sampling.ddim_loop."""
import torch

from mode_ros.model.config import DenoiserConfig, preset
from mode_ros.model.denoiser import EDMPrecond, MoDEDenoiser
from mode_ros.model.expert_cache import CachedSampler
from mode_ros.model.fast import FusedSampler
from mode_ros.model.sampling import ddim_loop, ddim_step, edm_denoise, make_schedule


def net_with_sharp_routing(seed: int = 0) -> MoDEDenoiser:
    torch.manual_seed(seed)
    net = MoDEDenoiser(DenoiserConfig(embed_dim=32, n_layers=2, n_heads=2), action_dim=7, chunk_size=10,
                       n_cameras=0, state_dim=3).eval()
    for blk in net.blocks:   # make routing depend on sigma (the reference init is nearly uniform)
        torch.nn.init.normal_(blk.router.fc2.weight, std=2.0)
    return net


def test_block_route_model_routing_and_table_agree():
    """The block's eval routing, the model's routing of a schedule and the cached table (computed in
    float32 whatever the model dtype) select the same experts with the same gates, and the schedule
    exercises more than one expert pair."""
    net = net_with_sharp_routing()
    sampler = CachedSampler(net, EDMPrecond(0.5), make_schedule(preset("tiny").diffusion))
    table = sampler.ensure()
    sig = table.sigmas[:-1]
    idx, gates, probs = net.routing(sig)
    assert torch.equal(idx, table.indices_t) and torch.equal(gates, table.gates)
    c = net.noise_embedding(sig)
    for l, blk in enumerate(net.blocks):
        dense = blk.route(c, 5)   # (S, T, E)
        for s in range(len(sig)):
            assert torch.equal(dense[s, 0, idx[s, l]], gates[s, l]) and dense[s, 0].count_nonzero() == 2
    assert max(table.distinct_pairs()) > 1
    net.to(torch.bfloat16)
    sampler.invalidate()
    assert torch.equal(sampler.ensure().indices_t, table.indices_t)


def test_cached_step_is_edm_around_the_network_body():
    """CachedSampler.denoise_step = edm_denoise(network body with the table's selection) = the plain
    forward's D at that sigma (dense routing), to rounding."""
    net = net_with_sharp_routing()
    pre = EDMPrecond(0.5)
    sampler = CachedSampler(net, pre, make_schedule(preset("tiny").diffusion))
    t = sampler.ensure()
    g = torch.Generator().manual_seed(1)
    goal, st, x = torch.randn(2, 512, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 10, 7, generator=g)
    ctx = net.context_tokens(goal, None, st)
    with torch.no_grad():
        for i in (0, 4, 9):
            d = sampler.denoise_step(i, x, ctx)
            body = edm_denoise(x, lambda a: net.body(t.noise_emb[i].expand(2, 1, -1), ctx, a,
                                                     selections=t.selections(i))[0], t.c_in[i], t.c_skip[i], t.c_out[i])
            assert torch.equal(d, body)
            plain = pre.denoise(net, x, t.sigmas[i], goal, None, st)
            assert (d - plain).abs().max() < 1e-5


def test_ddim_loop_advance_equals_denoise_then_update():
    """A fused whole step (``advance``) and D + the DDIM update give the same chunk; with the fused
    sampler's whole-step function both ways agree with the cached sampler."""
    net = net_with_sharp_routing()
    cached = CachedSampler(net, EDMPrecond(0.5), make_schedule(preset("tiny").diffusion))
    t = cached.ensure()
    g = torch.Generator().manual_seed(2)
    goal, st = torch.randn(1, 512, generator=g), torch.randn(1, 3, generator=g)
    x_T = 80 * torch.randn(1, 10, 7, generator=g)
    with torch.no_grad():
        ref = cached.sample(x_T, goal, None, st)
        fused = FusedSampler(cached, whole_step=True)
        fused.build()
        ctx = net.context_tokens(goal, None, st)
        via_d = ddim_loop(lambda i, x: fused.denoise_step(i, x, ctx), x_T, t.ratio)
        via_advance = ddim_loop(None, x_T, t.ratio, advance=lambda i, x: fused.advance(i, x, ctx, t.ratio[i]))
    assert torch.equal(via_d, via_advance) or (via_d - via_advance).abs().max() < 1e-6
    assert (via_advance - ref).abs().max() < 1e-4
    assert torch.equal(ddim_step(x_T, ref, torch.tensor(0.0)), ref)
