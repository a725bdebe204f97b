"""MoDE model: reference fixture, caching, shapes, gradients, determinism, io, accounting."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_ros.model.config import ConfigError, PolicyConfig, preset
from mode_ros.model.denoiser import EDMPrecond, MoDEDenoiser, count_matmul_flops
from mode_ros.model.expert_cache import CachedSampler
from mode_ros.model.policy import Affine, MoDEPolicy
from mode_ros.model.reference import (check_reference, convert_denoiser_state_dict, export_denoiser_state_dict)
from mode_ros.model.sampling import exponential_schedule, make_schedule, sample_ddim, sample_training_sigmas

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mode_reference_small"


def small_net(n_cameras=2, state_dim=0, layers=2, d=32, heads=2, experts=4, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = preset("tiny").model
    cfg.embed_dim, cfg.n_layers, cfg.n_heads, cfg.num_experts, cfg.top_k = d, layers, heads, experts, top_k
    for k, v in kw.items():
        setattr(cfg, k, v)
    net = MoDEDenoiser(cfg, action_dim=7, chunk_size=10, n_cameras=n_cameras, state_dim=state_dim)
    # make routing sigma-dependent (the reference init makes it nearly uniform)
    with torch.no_grad():
        for b in net.blocks:
            b.router.fc1.weight.normal_(0, 0.3)
            b.router.fc2.weight.normal_(0, 0.3)
            b.router.fc2.bias.normal_(0, 0.3)
        net.pos_emb.normal_(0, 0.5)
    return net.eval()


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"reference fixture not found at {FIXTURE}")
def test_reference_fixture_matches():
    ok, rows = check_reference(FIXTURE, tol=1e-5)
    bad = [r for r in rows if not r["ok"]]
    assert ok, bad
    assert {r["key"] for r in rows} >= {"denoise.D", "denoise.F", "sample.actions", "cached.actions", "routing.indices"}


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="reference fixture not found")
def test_check_reference_cli_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "check-reference", str(FIXTURE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 19/19" in r.stdout
    # a tampered fixture must fail with a non-zero exit code
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    w = load_file(str(bad / "weights.safetensors"))
    w["inner_model.pos_emb"] = w["inner_model.pos_emb"].roll(1, dims=1)
    save_file(w, str(bad / "weights.safetensors"))
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "check-reference", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_reference_layout_round_trip():
    net = small_net()
    ref = export_denoiser_state_dict(net.state_dict(), prefix="model.inner_model.")
    assert "model.inner_model.blocks.0.experts.expert_3.mlp.0.project.weight" in ref
    assert "model.inner_model.blocks.1.router.router.mlp.3.bias" in ref
    back = convert_denoiser_state_dict({k[len("model.inner_model."):]: v for k, v in ref.items()})
    net2 = small_net(seed=1)
    net2.load_state_dict(back, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k]), k


def test_schedule_and_training_density():
    s = exponential_schedule(10, 0.001, 80)
    expected = [80, 22.8193, 6.509, 1.85664, 0.529589, 0.151061, 0.0430887, 0.0122907, 0.00350581, 0.001, 0]
    assert np.allclose(s.numpy(), expected, rtol=1e-4)
    assert np.allclose((s[1:-1] / s[:-2]).numpy(), 0.285241, rtol=1e-5)
    cfg = preset("tiny").diffusion
    sig = sample_training_sigmas(cfg, 200_000, generator=torch.Generator().manual_seed(0))
    assert sig.min() >= 0.001 and sig.max() <= 80
    assert abs(sig.median().item() - 0.5) < 0.01
    lo, hi = np.quantile(sig.numpy(), [0.05, 0.95])
    assert abs(lo - 0.115) < 0.01 and abs(hi - 2.18) < 0.05


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("state_dim", [0, 5])
def test_cached_equals_uncached(batch, state_dim):
    net = small_net(state_dim=state_dim)
    pre = EDMPrecond(0.5)
    sig = make_schedule(preset("tiny").diffusion)
    g = torch.Generator().manual_seed(3)
    goal = torch.randn(batch, 512, generator=g)
    obs = torch.randn(batch, 2, 512, generator=g)
    st = torch.randn(batch, state_dim, generator=g) if state_dim else None
    x_T = 80 * torch.randn(batch, 10, 7, generator=g)
    ref = sample_ddim(lambda x, s: pre.denoise(net, x, s, goal, obs, st), x_T, sig)
    sync = sample_ddim(lambda x, s: pre.denoise(net, x, s, goal, obs, st, mode="sync"), x_T, sig)
    sampler = CachedSampler(net, pre, sig)
    cached = sampler.sample(x_T, goal, obs, st)
    assert torch.allclose(cached, ref, atol=1e-6, rtol=0), (cached - ref).abs().max()
    assert torch.allclose(sync, ref, atol=1e-6, rtol=0)
    # routing is actually sigma dependent here, so the test exercises several expert pairs
    assert max(sampler.table.distinct_pairs()) >= 2


def test_cache_invalidated_by_weights_and_schedule():
    net = small_net()
    pre = EDMPrecond(0.5)
    sampler = CachedSampler(net, pre, make_schedule(preset("tiny").diffusion))
    t1 = sampler.ensure()
    assert sampler.ensure() is t1  # reused while nothing changed
    with torch.no_grad():
        net.blocks[0].router.fc2.bias.add_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
    t2 = sampler.ensure()
    assert t2 is not t1 and set(t2.indices[0][0]) == {0, 2}
    sampler.set_schedule(exponential_schedule(5, 0.001, 80))
    assert len(sampler.ensure().indices) == 5


def test_policy_caches_follow_weight_loads_and_bad_calls_are_clear():
    """A partial load_state_dict (experts only: the routing key cannot see it) rebuilds the fused
    copies; enable_fast(fused=False) turns fusion off; a policy left in training mode still infers in
    eval mode; a constant action dimension comes back as its recorded value; clear errors for
    0 steps, an unknown dtype and cameras of different batch sizes."""
    from mode_ros.model.policy import Affine
    torch.manual_seed(0)
    pol = MoDEPolicy(preset("tiny")).eval()
    pol.set_goal_embeddings({"go": torch.randn(512)})
    imgs = [np.full((32, 32, 3), 50, np.uint8) for _ in pol.camera_names]
    st = np.zeros(pol.state_dim, np.float32) if pol.state_dim else None
    assert pol.enable_fast(fused=True)["fused"]
    a = pol.predict_chunk(imgs, "go", state=st, seed=1)
    moe = {k: v + 0.05 * torch.randn_like(v) for k, v in pol.denoiser.state_dict().items() if ".moe." in k}
    pol.denoiser.load_state_dict(moe, strict=False)
    fused = pol.predict_chunk(imgs, "go", state=st, seed=1)
    assert not pol.enable_fast(fused=False)["fused"] and pol.fused is None
    eager = pol.predict_chunk(imgs, "go", state=st, seed=1)
    assert np.abs(fused - a).max() > 1e-3 and np.abs(fused - eager).max() < 1e-5
    pol.train()
    assert np.array_equal(pol.predict_chunk(imgs, "go", state=st, seed=1), eager) and pol.training
    pol.eval()
    pol.action_norm = Affine(np.full(7, 0.08), np.ones(7), [True] + [False] * 6)
    pol.config.gripper_dims = [0]
    out = pol.predict_chunk(imgs, "go", state=st, seed=1)
    assert np.all(out[:, 0] == np.float32(0.08))          # not 0.08 ± 1 from binarising the gripper
    assert Affine.from_dict(pol.action_norm.to_dict()).constant[0]
    with pytest.raises(ValueError, match="num_steps"):
        pol.set_num_steps(0)
    with pytest.raises(ValueError, match="dtype"):
        pol.to_device("cpu", "half")
    if len(pol.camera_names) > 1:
        batch = [np.zeros((2, 32, 32, 3), np.uint8), np.zeros((3, 32, 32, 3), np.uint8)]
        with pytest.raises(ValueError, match="batch size"):
            pol.predict_chunk_batch(batch, ["go", "go"], None if st is None else np.stack([st, st]))


def test_gradients_reach_every_trained_parameter():
    torch.manual_seed(0)
    policy = MoDEPolicy(preset("tiny")).train()
    policy.config.state_dim  # noqa: B018
    b = 8
    batch = {"images": torch.randint(0, 255, (b, 2, 3, 32, 32), dtype=torch.uint8),
             "goal_emb": torch.randn(b, 512), "actions": torch.randn(b, 10, 7).clamp(-1, 1)}
    loss, aux = policy.loss(batch)
    (loss + 0.01 * aux["load_balance"]).backward()
    no_grad = [n for n, p in policy.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert no_grad == [], no_grad
    assert 1.9 < aux["load_balance"].item() < 2.6  # balanced top-2 minimum is k = 2


def test_load_balance_minimum_is_k():
    from mode_ros.model.moe import load_balance_loss
    gates = torch.zeros(8, 4)
    gates[torch.arange(8), torch.arange(8) % 4] = 0.5
    gates[torch.arange(8), (torch.arange(8) + 1) % 4] = 0.5
    assert math.isclose(load_balance_loss(gates, 4).item(), 2.0, rel_tol=1e-6)
    collapsed = torch.zeros(8, 4)
    collapsed[:, :2] = 0.5
    assert load_balance_loss(collapsed, 4).item() > 3.9


def test_training_routing_is_sampled_per_token_and_eval_is_topk():
    net = small_net()
    blk = net.blocks[0]
    c = net.noise_embedding(torch.tensor([0.5]))
    blk.train()
    torch.manual_seed(0)
    g_train = blk.route(c, 200)[0]  # (T, E)
    pairs = {tuple(torch.nonzero(row).flatten().tolist()) for row in g_train}
    assert len(pairs) > 1 and all(len(p) == 2 for p in pairs)
    assert torch.allclose(g_train.sum(-1), torch.ones(200))
    blk.eval()
    g_eval = blk.route(c, 14)[0]
    assert all(torch.equal(g_eval[0], r) for r in g_eval)


def test_policy_predict_determinism_shapes_and_io(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.state_dim = 3
    cfg.gripper_dims = [6]
    norm = Affine(np.linspace(-1, 1, 7), np.linspace(0.5, 2, 7))
    norm.offset[6] = 0.0
    p = MoDEPolicy(cfg, action_norm=norm, state_norm=Affine(np.zeros(3), np.ones(3) * 2)).eval()
    p.set_goal_embeddings({"open the drawer": torch.randn(512)})
    imgs = {"static": np.random.randint(0, 255, (40, 50, 3), np.uint8), "gripper": np.random.randint(0, 255, (20, 20, 3), np.uint8)}
    a1 = p.predict_chunk(imgs, "open the drawer", state=[0.1, 0.2, 0.3], seed=7)
    a2 = p.predict_chunk(imgs, "open the drawer", state=[0.1, 0.2, 0.3], seed=7)
    a3 = p.predict_chunk(imgs, "open the drawer", state=[0.1, 0.2, 0.3], seed=8)
    assert a1.shape == (10, 7) and a1.dtype == np.float32
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    assert set(np.unique(a1[:, 6])) <= {-2.0, 2.0}  # offset 0 +- scale 2: the recorded extremes
    batch = p.predict_chunk_batch({k: np.stack([v, v]) for k, v in imgs.items()}, ["open the drawer"] * 2,
                                  np.array([[0.1, 0.2, 0.3]] * 2), seed=1)
    assert batch.shape == (2, 10, 7)
    p.save_pretrained(tmp_path / "ck")
    q = MoDEPolicy.from_pretrained(tmp_path / "ck")
    assert q.known_goals == ["open the drawer"]
    assert np.array_equal(q.predict_chunk(imgs, "open the drawer", state=[0.1, 0.2, 0.3], seed=7), a1)
    with pytest.raises(ValueError, match="state"):
        p.predict_chunk(imgs, "open the drawer", state=[np.nan, 0, 0])
    with pytest.raises(ValueError, match="camera 'static'"):
        p.predict_chunk({"static": np.zeros((4, 4), np.uint8), "gripper": imgs["gripper"]}, "open the drawer", state=[0, 0, 0])
    with pytest.raises(ValueError, match="empty"):
        p.predict_chunk(imgs, "   ", state=[0, 0, 0])


def test_goal_cache_only_checkpoint_rejects_unknown_goal(tmp_path):
    from mode_ros.model.encoders import GoalError
    cfg = preset("tiny")
    cfg.text.random_init_seed = None
    p = MoDEPolicy(cfg)
    p.set_goal_embeddings({"push the button": torch.randn(512)})
    p.encode_goal("push  the button ")  # whitespace-normalised hit
    with pytest.raises(GoalError, match="cached instructions"):
        p.encode_goal("open the drawer")


def test_text_encoder_lru_and_local_weights(tmp_path):
    from mode_ros.model.encoders import TextEncoder
    enc = TextEncoder("tiny", random_init_seed=0, cache_size=2)
    e1 = enc.encode(["a", "b"])
    enc.encode(["a"])        # a becomes most recent
    enc.encode(["c"])        # evicts b
    assert list(enc.cache) == ["a", "c"]
    assert e1.shape == (2, 512) and e1.dtype == torch.float32
    torch.save(enc.model.state_dict(), tmp_path / "text.pt")
    enc2 = TextEncoder("tiny", weights=str(tmp_path / "text.pt"))
    assert torch.allclose(enc2.encode(["a"]), e1[:1], atol=1e-6)


def test_resnet50_local_weights_and_film_identity(tmp_path):
    from torchvision.models import resnet50
    from mode_ros.model.encoders import FiLMResNet50
    torch.manual_seed(0)
    ref = resnet50(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    enc = FiLMResNet50(weights=str(tmp_path / "r50.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref.fc = torch.nn.Identity()
        # zero-initialised FiLM = identity modulation: equals the plain backbone
        assert torch.allclose(enc(x, torch.randn(1, 512)), ref(x), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        FiLMResNet50(weights=str(tmp_path / "missing.pth"))


def test_config_validation_names_the_key():
    d = preset("tiny").to_dict()
    d["model"]["n_layer"] = 3
    with pytest.raises(ConfigError, match="model.n_layer"):
        PolicyConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["model"]["n_layers"] = "3"
    with pytest.raises(ConfigError, match="model.n_layers: expected int"):
        PolicyConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["model"]["embed_dim"] = 31
    with pytest.raises(ConfigError, match="divisible"):
        PolicyConfig.from_dict(d)


def test_paper_parameter_counts():
    from mode_ros.model.info import policy_counts
    c8 = policy_counts(preset("paper-8l"), include_text=False)
    assert round(c8["transformer"]["total"] / 1e6, 2) == 456.02
    assert round(c8["transformer"]["executed_cached"] / 1e6, 2) == 237.18
    assert round(c8["vision_per_camera"]["total"] / 1e6, 2) == 13.41
    c12 = policy_counts(preset("pretrain-12l"), include_text=False)
    assert round(c12["transformer"]["total"] / 1e6, 2) == 685.85
    assert round(c12["vision_per_camera"]["total"] / 1e6, 2) == 27.45
    assert abs(c8["flops_per_step"]["cached"]["total"] / 1e9 - 6.59) < 0.01


def test_flop_count_matches_torch_counter():
    from torch.utils.flop_counter import FlopCounterMode
    net = small_net(d=64, layers=2)
    pre = EDMPrecond(0.5)
    sampler = CachedSampler(net, pre, make_schedule(preset("tiny").diffusion))
    sampler.ensure()
    goal, obs, x = torch.randn(1, 512), torch.randn(1, 2, 512), torch.randn(1, 10, 7)
    with torch.no_grad():
        ctx = net.context_tokens(goal, obs, None)
        with FlopCounterMode(display=False) as fc:
            sampler.denoise_step(3, x, ctx)
        counted_step = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc2:
            net.context_tokens(goal, obs, None)
    analytic = count_matmul_flops(net, cached=True)
    ctx_flops = fc2.get_total_flops()
    # the analytic count includes the context embeddings; the counter may skip the CPU SDPA kernel
    no_sdpa = analytic["total"] - analytic["attention_scores"]
    assert abs((counted_step + ctx_flops) - no_sdpa) / no_sdpa < 0.02 or \
        abs((counted_step + ctx_flops) - analytic["total"]) / analytic["total"] < 0.02


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_sampler_equals_cached(batch):
    from mode_ros.model.fast import FusedSampler
    net = small_net(state_dim=2)
    pre = EDMPrecond(0.5)
    cached = CachedSampler(net, pre, make_schedule(preset("tiny").diffusion))
    fused = FusedSampler(cached)
    g = torch.Generator().manual_seed(5)
    goal, obs, st = torch.randn(batch, 512, generator=g), torch.randn(batch, 2, 512, generator=g), torch.randn(batch, 2, generator=g)
    x_T = 80 * torch.randn(batch, 10, 7, generator=g)
    a = cached.sample(x_T, goal, obs, st)
    b = fused.sample(x_T, goal, obs, st)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    # only the distinct expert sets of the table are fused (<= C(4,2) per layer)
    per_layer = cached.table.distinct_pairs()
    assert len(fused.experts) == sum(per_layer)
    # every selected pair is a strided view of the model's stacked experts: no expert weight is copied
    assert fused.expert_copies() == []
    own = {blk.moe.w1.untyped_storage().data_ptr() for blk in net.blocks}
    assert all(e[0].untyped_storage().data_ptr() in own for e in fused.experts.values())
    qkv = sum(L["wqkv"].numel() + L["bqkv"].numel() for L in fused.layers)
    assert fused.extra_parameters() == qkv


def test_fused_whole_step_equals_cached():
    from mode_ros.model.fast import FusedSampler
    net = small_net()
    pre = EDMPrecond(0.5)
    cached = CachedSampler(net, pre, make_schedule(preset("tiny").diffusion))
    g = torch.Generator().manual_seed(9)
    goal, obs = torch.randn(2, 512, generator=g), torch.randn(2, 2, 512, generator=g)
    x_T = 80 * torch.randn(2, 10, 7, generator=g)
    a = cached.sample(x_T, goal, obs)
    for attention in ("sdpa", "matmul", "elementwise"):
        fused = FusedSampler(cached, whole_step=True, attention=attention)
        b = fused.sample(x_T, goal, obs)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (attention, (a - b).abs().max())
    with pytest.raises(ValueError, match="attention"):
        FusedSampler(cached, attention="flash")


def test_causal_attention_forms_agree():
    """The three attention formulations of the fused sampler: the same causal softmax attention
    (each query sees itself and earlier tokens only), in bf16 within bf16 rounding."""
    from mode_ros.model.fast import causal_attention
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 14, 16, generator=g) for _ in range(3))
    ref = causal_attention(q, k, v, "sdpa")
    # a future key changed: the earlier queries' outputs do not move
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:], v2[:, :, 9:] = 5.0, -5.0
    for kind in ("matmul", "elementwise"):
        out = causal_attention(q, k, v, kind)
        assert (out - ref).abs().max() < 1e-5, kind
        assert torch.equal(causal_attention(q, k2, v2, kind)[:, :, :9], out[:, :, :9])
        assert not torch.allclose(causal_attention(q, k2, v2, kind)[:, :, 9:], out[:, :, 9:])
        ob = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kind)
        assert ob.dtype == torch.bfloat16 and (ob.float() - ref).abs().max() < 3e-2, kind


def test_import_reference_agent_checkpoint(tmp_path):
    """An agent-level checkpoint in the authors' layout (Lightning-style state_dict) converts to a
    mode_ros checkpoint that reproduces the source model exactly."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = MoDEPolicy(preset("tiny")).eval()
    sd = export_denoiser_state_dict(src.denoiser.state_dict(), prefix="model.inner_model.")
    for cam, key in zip(src.camera_names, ("static_resnet", "gripper_resnet")):
        sd.update({f"{key}.{k}": v for k, v in src.encoders[cam].state_dict().items()})
    sd["language_goal.clip_rn50.dummy"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "agent.safetensors"))
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "import-reference", str(tmp_path / "agent.safetensors"),
                        "--preset", "tiny", "--out", str(tmp_path / "ck")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dst = MoDEPolicy.from_pretrained(tmp_path / "ck")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # the wrong architecture is refused with a clear message
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "import-reference", str(tmp_path / "agent.safetensors"),
                        "--preset", "reference-small", "--out", str(tmp_path / "ck2")], capture_output=True, text=True)
    assert r.returncode == 1 and "wrong --preset" in r.stderr


# ---- weight-only quantised experts (issue 8, item 2) -----------------------------------------------
@pytest.mark.parametrize("kind,rel", [("int8", 1 / 254), ("fp8", 1 / 16)])
def test_quantize_rows_error_bound(kind, rel):
    """Per-row scales: every weight is within half a step of its row's grid (int8: amax/254;
    fp8 e4m3: 3 mantissa bits -> relative error <= 2^-4 of the value, or the subnormal step)."""
    from mode_ros.model.fast import dequantize_rows, quantize_rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 0, 64)[:, None]   # rows of very different scale
    q, s = quantize_rows(w, kind, torch.float32)
    assert q.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn) and s.shape == (64,)
    err = (dequantize_rows(q, s) - w).abs()
    amax = w.abs().amax(1, keepdim=True)
    if kind == "int8":
        assert (err <= amax * rel * 1.0001).all()
    else:
        assert (err <= torch.maximum(w.abs() * rel, amax * 2.0 ** -9 / 448 * 1.0001 + 1e-12)).all()
    # the stored scale is rounded first, so the grid the kernel uses is the grid the weights were put on
    q2, s2 = quantize_rows(w, kind, torch.bfloat16)
    assert s2.dtype == torch.bfloat16
    assert ((dequantize_rows(q2, s2) - w).abs() <= err.max() * 1.05 + 1e-9).all()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantised_fused_sampler_close_to_fp32_with_same_routing(kind):
    from mode_ros.model.fast import FusedSampler
    net = small_net(d=64)
    cached = CachedSampler(net, EDMPrecond(0.5), make_schedule(preset("tiny").diffusion))
    g = torch.Generator().manual_seed(3)
    goal, obs = torch.randn(2, 512, generator=g), torch.randn(2, 2, 512, generator=g)
    x_T = 80 * torch.randn(2, 10, 7, generator=g)
    ref = cached.sample(x_T, goal, obs)
    table = cached.table
    q = FusedSampler(cached, weight_quant=kind)
    out = q.sample(x_T, goal, obs)
    assert cached.table is table                     # routing untouched: the same table, not rebuilt
    d = (out - ref).abs().max().item()
    assert 0 < d < (5e-3 if kind == "int8" else 3e-2), d   # quantised (not a copy), and close
    w1, b1, w2, s1, s2 = next(iter(q.experts.values()))
    assert w1.dtype == w2.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    assert s1 is not None and b1.dtype == torch.float32
    # one quantised copy per expert: every (layer, pair) entry is a view of its layer's stacked experts
    assert q.expert_copies() == [] and len(q.quantized) == len(net.blocks)
    stacked = {t.untyped_storage().data_ptr() for st in q.quantized for t in (st.w1, st.w2)}
    assert all(e[0].untyped_storage().data_ptr() in stacked and e[2].untyped_storage().data_ptr() in stacked
               for e in q.experts.values())
    expert_params = sum(blk.moe.w1.numel() + blk.moe.w2.numel() for blk in net.blocks)
    qkv = sum(L["wqkv"].numel() * 4 + L["bqkv"].numel() * 4 for L in q.layers)
    scales = sum(st.s1.untyped_storage().nbytes() + st.s2.untyped_storage().nbytes() for st in q.quantized)
    assert all(st.s2.stride(0) == 0 for st in q.quantized)   # one row scale shared by the experts of a layer
    assert q.extra_bytes() == expert_params + scales + qkv   # 1 byte per expert weight, once
    # ~4x fewer expert bytes than fp32; the non-expert weights are unchanged
    plain = FusedSampler(cached)
    assert q.weight_bytes_per_chunk() < 0.5 * plain.weight_bytes_per_chunk()
    # the whole-step function (compiled on GPUs) computes the same thing
    q2 = FusedSampler(cached, whole_step=True, weight_quant=kind)
    assert torch.allclose(q2.sample(x_T, goal, obs), out, atol=1e-5, rtol=0)



def test_released_full_precision_experts_leave_the_quantised_ones_and_the_same_chunks():
    """With quantised experts computing every chunk, ``release_expert_weights`` frees the stacked
    full-precision experts (the experts are then held once): the chunks are unchanged, a new step count
    rebuilds the fused sampler from the quantised experts it keeps, and what needs the freed weights
    (eager sampling, guidance, another enable_fast) raises. The deployed set-up does it unless the
    strategy is rtc_guidance."""
    from mode_ros.export.deploy import load_policy
    from mode_ros.model.inpainting import ChunkPrefix
    from mode_ros.ros.params import NodeParams
    pol = MoDEPolicy.from_preset("metaworld", seed=2).eval()
    pol.enable_fast(fused=True, weight_quant="int8")
    st = np.linspace(-1, 1, pol.state_dim).astype(np.float32)
    before = pol.predict_chunk(None, "reach", st, seed=4)
    pol.set_num_steps(3)
    before3 = pol.predict_chunk(None, "reach", st, seed=4)
    pol.set_num_steps(10)
    expert_bytes = sum(b.moe.w1.numel() * 4 + b.moe.w2.numel() * 4 for b in pol.sampler.net.blocks)
    assert pol.release_expert_weights() == expert_bytes and pol.experts_released
    assert all(b.moe.w1.is_meta and b.moe.w2.is_meta and not b.moe.b1.is_meta for b in pol.sampler.net.blocks)
    np.testing.assert_array_equal(pol.predict_chunk(None, "reach", st, seed=4), before)
    pol.set_num_steps(3)
    np.testing.assert_array_equal(pol.predict_chunk(None, "reach", st, seed=4), before3)
    with pytest.raises(RuntimeError, match="eager samplers need them"):
        pol.sample_normalized(None, torch.zeros(1, 512), torch.zeros(1, pol.state_dim), cached=False)
    with pytest.raises(RuntimeError, match="guidance needs them"):
        pol.predict_chunk(None, "reach", st, seed=4, prefix=ChunkPrefix(before[3:], fixed=2, method="guidance"))
    with pytest.raises(RuntimeError, match="expert weights were released"):
        pol.enable_fast(fused=True)
    base = {"checkpoint": "bundled", "weight_quant": "int8", "fast_inference": "fused"}
    deployed, described = load_policy(NodeParams.from_mapping(base))
    assert deployed.experts_released and "full-precision experts released" in described
    kept, described = load_policy(NodeParams.from_mapping({**base, "execution_strategy": "rtc_guidance"}))
    assert not kept.experts_released and "full-precision experts kept (rtc_guidance)" in described

def test_int8_kernel_matches_widened_weights():
    """torch._weight_int8pack_mm (CPU int8 kernel) and the generic widen-and-scale path agree."""
    from mode_ros.model.fast import int8_kernel_available, qlinear, quantize_rows
    if not int8_kernel_available(torch.device("cpu")):
        pytest.skip("torch._weight_int8pack_mm not available in this torch build")
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(96, 64, generator=g), torch.randn(96, generator=g), torch.randn(3, 5, 64, generator=g)
    q, s = quantize_rows(w, "int8", torch.bfloat16)
    k = qlinear(x, q, s, b, int8_kernel=True)
    r = qlinear(x, q, s, b, int8_kernel=False)
    assert k.shape == (3, 5, 96) and k.dtype == torch.float32
    # the kernel computes in bf16 activations: agreement to bf16 precision of the outputs
    assert ((k - r).abs() <= 2e-2 * r.abs().max()).all()
    assert ((r - torch.nn.functional.linear(x, w, b)).abs() <= 0.05 * r.abs().max()).all()


def test_policy_weight_quant_option(caplog):
    import logging
    torch.manual_seed(0)
    pol = MoDEPolicy(preset("tiny")).eval()
    imgs = [np.full((32, 32, 3), 60 * i, np.uint8) for i in range(len(pol.camera_names))]
    pol.set_goal_embeddings({"go": torch.randn(512)})
    a = pol.predict_chunk(imgs, "go", seed=1)
    with pytest.raises(ValueError, match="weight_quant"):
        pol.enable_fast(weight_quant="int4")
    log = logging.getLogger("test_quant")
    with caplog.at_level(logging.WARNING, logger="test_quant"):
        state = pol.enable_fast(fused=True, weight_quant="fp8", logger=log)
    assert state["weight_quant"] == "none" and "needs a CUDA device" in caplog.text   # CPU: fp8 refused, logged
    state = pol.enable_fast(fused=True, weight_quant="int8")
    assert state == {"fused": True, "compiled": False, "graph": False, "weight_quant": "int8",
                     "attention": "sdpa", "gemm": "torch", "pdl": False}
    b = pol.predict_chunk(imgs, "go", seed=1)
    assert b.shape == a.shape and np.isfinite(b).all()
    assert 0 < np.abs(b - a).max() < 1e-2 * max(1.0, np.abs(a).max())


def test_bench_command_reports_accuracy_and_routing(tmp_path):
    """`mode-ros bench` on CPU: JSON + table + PNG; each path's actions vs eager uncached fp32."""
    import json
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "bench", "--presets", "tiny", "--paths",
                        "uncached,cached,fused,int8,fp8,graph,dense", "--runs", "2", "--warmup", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    by = {x["path"]: x for x in rows}
    assert set(by) == {"uncached", "cached", "fused", "int8", "dense"}   # fp8 / graph: CUDA only, skipped
    assert by["uncached"]["max_abs_diff_vs_fp32"] == 0.0
    for p in ("cached", "fused"):
        assert by[p]["max_abs_diff_vs_fp32"] < 1e-5 and by[p]["same_routing_as_fp32"] is True
    assert 0 < by["int8"]["max_abs_diff_vs_fp32"] < 5e-3 and by["int8"]["same_routing_as_fp32"] is True
    assert by["int8"]["weight_bytes_per_chunk"] < 0.5 * by["fused"]["weight_bytes_per_chunk"]
    assert by["dense"]["max_abs_diff_vs_fp32"] is None
    for x in rows:
        assert x["median_ms"] > 0 and x["p99_ms"] >= x["median_ms"] and x["device"] == "cpu"
    assert "int8" in (out / "bench.txt").read_text() and (out / "bench.png").stat().st_size > 1000


def test_bench_preset_with_a_state():
    """A preset whose model reads a proprioceptive state (metaworld: state only, no camera) is benched
    with a random state (it raised a ValueError), and the fused path matches eager fp32 on it."""
    from mode_ros.model.bench import bench_preset
    rows = bench_preset("metaworld", "cpu", ["fp32"], ["uncached", "fused"], [1], runs=2, warmup=1, steps=2,
                        log=lambda s: None)
    assert [r["path"] for r in rows] == ["uncached", "fused"]
    assert rows[1]["max_abs_diff_vs_fp32"] < 1e-5 and rows[1]["same_routing_as_fp32"] is True



def test_bench_paths_are_timed_in_turn_withpaired_ratios():
    """The paths of one run are timed in rounds: a block of consecutive calls of each path in turn,
    after one untimed call, so load bursts hit every path alike; every row carries the median per-round
    speed-up over the fastest PyTorch path of the same rounds (the onnx paths are never that baseline)."""
    import statistics

    from mode_ros.model.bench import paired_ratios, time_in_rounds
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: 1 / 0}
    times, peaks = time_in_rounds(fns, torch.device("cpu"), runs=3, warmup=2, log=lambda m: None, block=2)
    assert calls == ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert [len(t) for t in times["a"]] == [2, 1] and set(times) == {"a", "b"} and peaks == {}
    times = {"cached": [[4.0, 4.0], [8.0]], "compiled": [[2.0, 2.0], [4.0]], "onnx": [[1.0, 3.0], [1.0]]}
    rows = [{"path": p, "median_ms": statistics.median(sum(t, []))} for p, t in times.items()]
    paired_ratios(rows, times)
    by = {r["path"]: r["paired_speedup_vs"] for r in rows}
    assert {v["path"] for v in by.values()} == {"compiled"}
    assert by["compiled"]["median"] == 1.0 and by["onnx"]["median"] == 2.5 and by["cached"]["median"] == 0.5

def test_bench_kernels_command(tmp_path):
    """`mode-ros bench --kernels` on a CPU: PyTorch's kernels of a layer-step are timed; the Triton rows
    say why they cannot run here (CUDA only), and the command still writes its JSON and table."""
    import json
    out = tmp_path / "k"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "bench", "--kernels", "--presets", "tiny",
                        "--sweep", "default", "--runs", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "kernels.json").read_text())["rows"]
    torch_rows = [x for x in rows if x["impl"] == "torch"]
    assert {x["op"] for x in torch_rows} == {"qkv", "proj", "attention", "up", "down", "attn+partials", "add+norm"}
    assert all(x["median_us"] > 0 and "failed" not in x for x in torch_rows)
    tri = [x for x in rows if x["impl"] == "triton"]
    assert tri and all("CUDA device" in x["failed"] for x in tri)
    assert "need a CUDA device" in r.stderr and "best blocks" in (out / "kernels.txt").read_text()


def test_target_summary_judges_each_variant():
    """The GPU script's verdict table: the denoiser's share is the chunk minus the encoders, the
    speed-up is against the baseline of the same run, failed rows are left out, each target judged."""
    from mode_ros.model.bench import target_summary
    rows = [{"attention": "triton", "compile_mode": "eager", "weight_quant": "none", "gemm": "triton",
             "median_ms": 3.5, "encoders_ms": 1.0, "max_abs_diff_vs_fp32": 0.007, "same_routing_as_fp32": True},
            {"attention": "matmul", "compile_mode": None, "weight_quant": "none", "gemm": "torch",
             "median_ms": 6.0, "encoders_ms": 1.0, "max_abs_diff_vs_fp32": 0.008, "same_routing_as_fp32": True},
            {"attention": "flash", "failed": "ValueError: attention"}]
    out, txt = target_summary(rows, baseline_ms=116.0)
    assert len(out) == 2
    a, b = out
    assert a["denoiser_ms"] == 2.5 and a["meets"] == {"denoiser": True, "total": True, "speedup": True}
    assert b["denoiser_ms"] == 5.0 and b["meets"] == {"denoiser": False, "total": False, "speedup": True}
    assert abs(b["speedup"] - 116.0 / 6.0) < 1e-9
    assert "triton/eager/none/triton" in txt and "116.00" in txt and "NO NO yes" in txt


def test_torch_compile_on_cpu_matches_eager():
    """The compiled whole-step function (what the GPU graph path captures) also compiles and runs on a
    CPU (Inductor C++ backend): same actions as the eager reference path, plain and with int8 experts."""
    torch.manual_seed(0)
    pol = MoDEPolicy(preset("tiny")).eval()
    g = torch.Generator().manual_seed(2)
    imgs = torch.randint(0, 255, (1, pol.config.n_cameras, 3, *pol.config.vision.image_size), dtype=torch.uint8,
                         generator=g)
    goal, noise = torch.randn(1, 512, generator=g), torch.randn(1, 10, pol.action_dim, generator=g)
    ref = pol.sample_normalized(imgs, goal, None, noise, cached=False)
    state = pol.enable_fast(fused=True, compile=True)
    assert state["compiled"] and pol.fused.whole_step
    a = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    assert (a - ref).abs().max() < 1e-5
    pol.enable_fast(fused=True, compile=True, weight_quant="int8")
    assert pol.fused.compile_mode is None      # max-autotune is the quantised default on CUDA only
    b = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    assert 0 < (b - ref).abs().max() < 5e-3
    # the GEMM-free attention formulation compiles too (Inductor generates its reductions)
    state = pol.enable_fast(fused=True, compile=True, attention="elementwise")
    assert state["compiled"] and pol.fused.attention == "elementwise"
    c = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    assert (c - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="attention"):
        pol.enable_fast(fused=True, attention="flash")


def test_step_variants_harness_runs_on_cpu():
    """The GPU script's step-variant section (mode_ros.model.bench.step_variants) on a CPU with the tiny
    preset: each variant gives a timed row with its accuracy and routing, and a bad variant is a
    ``failed`` row that does not stop the others (a GPU session has minutes only)."""
    from mode_ros.model.bench import MAX_AUTOTUNE, step_variants
    seen = []
    rows = step_variants("tiny", "cpu", "fp32", runs=3, warmup=1, log=lambda m: None,
                         variants=[("elementwise", None, "none"), ("flash", None, "none"),
                                   ("matmul", MAX_AUTOTUNE, "int8")],
                         on_row=lambda r: seen.append(len(r)))
    assert seen == [1, 2, 3]
    ok1, bad, ok2 = rows
    assert "attention" in bad["failed"] and "median_ms" not in bad
    for r, tol in ((ok1, 1e-5), (ok2, 5e-3)):
        assert "failed" not in r, r.get("failed")
        assert r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] and r["same_routing_as_fp32"]
        assert r["max_abs_diff_vs_fp32"] < tol
    assert ok2["compile_mode"] == MAX_AUTOTUNE and ok2["max_abs_diff_vs_fp32"] > 0


def test_select_fast_keeps_the_fastest_path_that_computes_the_same(monkeypatch):
    """select_fast measures each enable_fast configuration and keeps the fastest one whose actions match
    the plain cached sampler: a path outside the tolerance (int8 experts against 1e-6) and one that fails
    (an unknown attention formulation) are reported and never chosen; timings decide among the rest."""
    import logging

    from mode_ros.model import policy as policy_mod
    torch.manual_seed(0)
    pol = MoDEPolicy(preset("tiny")).eval()
    # fake clock: the fused path "takes" 1 ms per chunk, the unfused 3 ms, so the choice is not up to noise
    t = {"now": 0.0}

    def fake_perf_counter():
        t["now"] += (0.001 if pol.fused is not None else 0.003)   # per call: one call per time taken
        return t["now"]

    monkeypatch.setattr(policy_mod.time, "perf_counter", fake_perf_counter)
    cands = [{"fused": False}, {"fused": True}, {"fused": True, "weight_quant": "int8"},
             {"fused": True, "attention": "flash"}]
    sel = pol.select_fast(cands, runs=3, tolerance=1e-6, logger=logging.getLogger("t"))
    tr = sel["trials"]
    assert sel["chosen"] == 1 and sel["active"]["fused"] and pol.fused is not None
    assert tr[0]["median_ms"] == pytest.approx(3.0) and tr[1]["median_ms"] == pytest.approx(1.0)
    assert tr[0]["max_abs_diff"] == 0.0 and tr[1]["max_abs_diff"] <= 1e-6
    assert tr[2]["median_ms"] is None and "from the cached sampler" in tr[2]["error"] and tr[2]["max_abs_diff"] > 1e-6
    assert tr[3]["median_ms"] is None and "ValueError" in tr[3]["error"]
    # nothing qualifies: fast paths off
    sel = pol.select_fast([{"fused": True, "weight_quant": "int8"}], runs=2, tolerance=0.0)
    assert sel["chosen"] is None and pol.fused is None
