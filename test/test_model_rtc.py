"""Real-time chunking in the DDIM sampler (mode_ros.model.inpainting, MODE_SPEC Appendix C): the
previous plan's rows imposed by replacement or guidance, on the one sampler loop and routing table."""
import logging

import numpy as np
import pytest
import torch

from mode_ros.model.inpainting import ChunkPrefix, PrefixError, prefix_weights
from mode_ros.model.policy import Affine, MoDEPolicy

STATE_ONLY = {"arch": "none", "image_size": [32, 32], "random_shift_pad": [0]}


def tiny_policy(seed: int = 0) -> MoDEPolicy:
    """Tiny state-only policy with a non-identity normalisation and a gripper dimension."""
    torch.manual_seed(seed)
    p = MoDEPolicy.from_preset("tiny", seed=seed, camera_names=[], state_dim=3, vision=STATE_ONLY,
                               gripper_dims=[6]).eval()
    p.action_norm = Affine(np.linspace(-0.3, 0.4, 7), np.linspace(0.05, 2.0, 7))
    p.action_norm.offset[6] = 0.0
    p.set_goal_embeddings({"go": torch.randn(512)})
    return p


def inputs(p: MoDEPolicy, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 512, generator=g), torch.randn(1, 3, generator=g), torch.randn(1, 10, 7, generator=g)


STATE = np.array([0.1, -0.2, 0.3], np.float32)


def test_chunk_prefix_validation_names_the_problem():
    a = np.zeros((6, 7), np.float32)
    for kwargs, msg in (({"actions": np.zeros(7)}, "shape (n, action_dim)"),
                        ({"actions": a, "fixed": 7}, "fixed: 7 not in [0, n=6]"),
                        ({"actions": a, "fixed": 2.0}, "expected an int"),
                        ({"actions": a, "method": "blend"}, "method: 'blend'"),
                        ({"actions": a, "decay": "cosine"}, "decay: 'cosine'"),
                        ({"actions": a * np.nan}, "NaN"),
                        ({"actions": a, "guidance_max": -1.0}, "guidance_max")):
        with pytest.raises(PrefixError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            ChunkPrefix(**{"fixed": 1, **kwargs})
    with pytest.raises(PrefixError, match="4 action dims, the policy has 7"):
        ChunkPrefix(np.zeros((3, 4)), 1).check(10, 7)
    with pytest.raises(PrefixError, match="11 rows, more than the chunk size 10"):
        ChunkPrefix(np.zeros((11, 7)), 1).check(10, 7)
    p = tiny_policy()
    with pytest.raises(PrefixError, match="4 action dims"):
        p.predict_chunk(None, "go", STATE, seed=0, prefix=ChunkPrefix(np.zeros((3, 4)), 1))


def test_prefix_weights_frozen_decaying_free():
    w = prefix_weights(8, 3, 10)
    assert np.array_equal(w[:3], np.ones(3)) and np.array_equal(w[8:], np.zeros(2))
    assert np.all(np.diff(w[3:8]) < 0) and 0 < w[7] < w[3] < 1
    # Black et al.: c = (n - j) / (n - d + 1), W = c (e^c - 1) / (e - 1)
    c = 5 / 6
    assert w[3] == pytest.approx(c * np.expm1(c) / np.expm1(1.0), rel=1e-6)
    assert np.array_equal(prefix_weights(8, 3, 10, "hard"), np.r_[np.ones(3), np.zeros(7)].astype(np.float32))
    assert prefix_weights(8, 3, 10, "linear")[3] == pytest.approx(5 / 6)
    with pytest.raises(PrefixError, match="fixed"):
        prefix_weights(4, 5, 10)


def test_no_prefix_and_zero_weights_reproduce_the_plain_sampler_bit_for_bit():
    """prefix=None is the plain sampler; a prefix whose weights are all 0 (fixed 0, hard decay) runs
    the RTC machinery (inpainting arithmetic, the VJP) and still changes no bit."""
    p = tiny_policy()
    goal, st, noise = inputs(p)
    plain = p.sample_normalized(None, goal, st, noise)
    a = p.predict_chunk(None, "go", STATE, seed=5)
    assert np.array_equal(a, p.predict_chunk(None, "go", STATE, seed=5, prefix=None))
    for method in ("replace", "guidance"):
        pre = ChunkPrefix(np.ones((6, 7), np.float32), fixed=0, method=method, decay="hard")
        out = p.sample_normalized(None, goal, st, noise, guide=p.chunk_guide([pre], noise))
        assert torch.equal(out, plain), method
        assert np.array_equal(p.predict_chunk(None, "go", STATE, seed=5, prefix=pre), a), method


@pytest.mark.parametrize("method", ["replace", "guidance"])
def test_prefix_rows_equal_previous_plan_and_overlap_is_pulled(method):
    """The d executed rows are the previous plan exactly in robot units (non-identity normalisation,
    a gripper dimension); before that copy the sampler itself lands on them (normalised units: replace
    within 1e-2, guidance within 1e-3 — its last step has weight 1 and D ~ x); the overlap rows are
    much closer to the previous plan than without a prefix."""
    p = tiny_policy()
    prev = p.predict_chunk(None, "go", STATE, seed=11)          # the previous plan
    plain = p.predict_chunk(None, "go", STATE, seed=3)
    pre = ChunkPrefix(prev[3:], fixed=3, method=method)          # executed 3 rows since; 3 more before landing
    got = p.predict_chunk(None, "go", STATE, seed=3, prefix=pre)
    assert np.array_equal(got[:3], prev[3:6])
    assert np.all(np.isin(got[:, 6], [-2.0, 2.0]))               # gripper stays binarised (scale 2)
    overlap = slice(3, 7)
    err = np.abs(got[overlap, :6] - prev[3:][overlap, :6]).mean()
    err_plain = np.abs(plain[overlap, :6] - prev[3:][overlap, :6]).mean()
    assert err < 0.6 * err_plain, (err, err_plain)
    # normalised, before the copy of the frozen rows
    goal, st, noise = inputs(p)
    known = torch.from_numpy(p.action_norm.normalize(prev[3:]))
    out = p.sample_normalized(None, goal, st, noise, guide=p.chunk_guide([pre], noise))[0]
    tol = 1e-2 if method == "replace" else 1e-3
    assert (out[:3, :6] - known[:3, :6]).abs().max() < tol


def test_routing_table_is_reused_not_recomputed(monkeypatch):
    p = tiny_policy()
    p.predict_chunk(None, "go", STATE, seed=0)
    table, key = p.sampler.table, p.sampler.table.key
    calls = []
    monkeypatch.setattr(p.denoiser, "routing", lambda *a, **k: calls.append(1))
    for method in ("replace", "guidance"):
        p.predict_chunk(None, "go", STATE, seed=1, prefix=ChunkPrefix(np.zeros((7, 7), np.float32), 2, method))
    assert calls == [] and p.sampler.table is table and p.sampler.table.key == key
    assert all(not t.requires_grad for t in (table.gates, table.noise_emb))


def test_fused_sampler_replacement_guidance_and_fallback(caplog):
    """Both methods run on the eager fused sampler (same result as on the cached one to rounding);
    a fused sampler without autograd (int8 experts here; also compiled or Triton) runs guidance on the
    cached eager sampler instead — the same chunk bit for bit — with the reason logged once."""
    p = tiny_policy()
    prev = p.predict_chunk(None, "go", STATE, seed=11)
    ref = {m: p.predict_chunk(None, "go", STATE, seed=3, prefix=ChunkPrefix(prev[3:], 3, m))
           for m in ("replace", "guidance")}
    p.enable_fast(fused=True)
    assert p.fused is not None and p.fused.differentiable
    for m in ("replace", "guidance"):
        got = p.predict_chunk(None, "go", STATE, seed=3, prefix=ChunkPrefix(prev[3:], 3, m))
        assert np.abs(got - ref[m]).max() < 1e-4 and np.array_equal(got[:3], prev[3:6]), m
    p.enable_fast(fused=True, weight_quant="int8")
    assert p.fused is not None and not p.fused.differentiable
    with caplog.at_level(logging.INFO, logger="mode_ros.policy"):
        for _ in range(2):
            got = p.predict_chunk(None, "go", STATE, seed=3, prefix=ChunkPrefix(prev[3:], 3, "guidance"))
            assert np.array_equal(got, ref["guidance"])
    assert sum("cached eager sampler" in r.getMessage() for r in caplog.records) == 1


def test_batch_prefixes_must_share_method():
    p = tiny_policy()
    a = np.zeros((5, 7), np.float32)
    with pytest.raises(PrefixError, match="share method"):
        p.predict_chunk_batch(None, ["go", "go"], np.zeros((2, 3), np.float32), seed=0,
                              prefixes=[ChunkPrefix(a, 1, "replace"), ChunkPrefix(a, 1, "guidance")])
    out = p.predict_chunk_batch(None, ["go", "go"], np.stack([STATE, STATE]), seed=0,
                                prefixes=[None, ChunkPrefix(a + 0.25, 2)])
    assert np.array_equal(out[1, :2], a[:2] + 0.25) and not np.array_equal(out[0, :2], a[:2] + 0.25)


def test_training_time_prefix_rows_are_read_clean_and_carry_no_loss():
    """EDMPrecond.loss with prefix_rows: the network reads the given rows as the clean actions
    (c_in x = a), and those rows do not enter the loss."""
    from mode_ros.model.denoiser import EDMPrecond

    pre = EDMPrecond(0.5)
    g = torch.Generator().manual_seed(0)
    actions, noise = torch.randn(3, 10, 7, generator=g), torch.randn(3, 10, 7, generator=g)
    sigma = torch.tensor([80.0, 1.0, 0.01])
    rows = torch.tensor([0, 3, 5])
    seen = {}

    def net(a_in, s, goal, obs, state, return_aux=False):
        seen["a_in"] = a_in
        c_skip, c_out, c_in = (v.view(-1, 1, 1) for v in pre.scalings(s))
        x = a_in / c_in
        target = (actions - c_skip * x) / c_out
        given = torch.arange(10).view(1, -1, 1) < rows.view(-1, 1, 1)
        return torch.where(given, torch.full_like(target, 1e3), target), {}   # wrong only on the given rows
    loss, _ = pre.loss(net, actions, sigma, None, noise=noise, prefix_rows=rows)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(seen["a_in"][1, :3], actions[1, :3], atol=1e-6)
    assert torch.allclose(seen["a_in"][2, :5], actions[2, :5], atol=1e-6)
    c_in = 1 / (sigma ** 2 + 0.25).sqrt()
    assert torch.allclose(seen["a_in"][0], (actions[0] + 80.0 * noise[0]) * c_in[0], atol=1e-6)   # row count 0: plain
    loss_plain, _ = pre.loss(net, actions, sigma, None, noise=noise)
    assert float(loss_plain) > 1e4   # the same net without prefix rows is penalised on them


def test_sample_prefix_rows_follows_the_config():
    from mode_ros.model.config import ConfigError, DiffusionConfig, PolicyConfig
    from mode_ros.model.sampling import sample_prefix_rows

    assert sample_prefix_rows(DiffusionConfig(), 8) is None
    rows = sample_prefix_rows(DiffusionConfig(prefix_prob=0.5, prefix_max_rows=4), 20000,
                              generator=torch.Generator().manual_seed(0))
    assert int(rows.min()) == 0 and int(rows.max()) == 4
    assert (rows > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    counts = torch.bincount(rows[rows > 0], minlength=5)[1:].float() / (rows > 0).sum()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    with pytest.raises(ConfigError, match="prefix_max_rows must be >= 1"):
        DiffusionConfig(prefix_prob=0.3).validate()
    # one deployment delay: exactly d rows whenever a prefix is given (the default min of 1 draws the
    # same numbers as before the option existed)
    fixed = sample_prefix_rows(DiffusionConfig(prefix_prob=0.8, prefix_max_rows=5, prefix_min_rows=5), 20000,
                               generator=torch.Generator().manual_seed(0))
    assert set(fixed.unique().tolist()) == {0, 5}
    assert (fixed == 5).float().mean().item() == pytest.approx(0.8, abs=0.02)
    again = sample_prefix_rows(DiffusionConfig(prefix_prob=0.5, prefix_max_rows=4, prefix_min_rows=1), 20000,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, rows)
    with pytest.raises(ConfigError, match="prefix_min_rows must be in 1..prefix_max_rows"):
        DiffusionConfig(prefix_prob=0.3, prefix_max_rows=2, prefix_min_rows=3).validate()
    with pytest.raises(ConfigError, match=r"prefix_prob must be in \[0, 1\]"):
        DiffusionConfig(prefix_prob=1.5, prefix_max_rows=2).validate()
    cfg = PolicyConfig(camera_names=[], state_dim=3, chunk_size=4)
    cfg.diffusion = DiffusionConfig(prefix_prob=0.5, prefix_max_rows=4)
    with pytest.raises(ConfigError, match="must be below chunk_size"):
        cfg.validate()


def test_prefix_trained_policy_reads_its_frozen_rows_clean_at_every_step():
    """A prefix-trained checkpoint (diffusion.prefix_prob > 0) is sampled with its frozen rows given clean
    at every denoising step; the overlap rows are replaced as usual; no prefix: the plain sampler."""
    p = tiny_policy()
    p.config.diffusion.prefix_prob, p.config.diffusion.prefix_max_rows = 0.5, 5
    goal, st, noise = inputs(p)
    plain = p.sample_normalized(None, goal, st, noise, cached=True)
    from mode_ros.model.inpainting import prefix_guide

    known = torch.randn(1, 10, 7)
    w = torch.from_numpy(prefix_weights(6, 3, 10))
    seen = []
    orig = p.sampler.denoise_step

    def spy(i, x, ctx):
        seen.append((i, x.clone()))
        return orig(i, x, ctx)
    guide = prefix_guide([ChunkPrefix(known[0, :6].numpy(), 3)], lambda a: a, noise, p.sampler.schedule(),
                         0.5, clean=p.config.diffusion.prefix_trained)
    assert guide.clean
    p.sampler.denoise_step = spy
    try:
        p.sample_normalized(None, goal, st, noise, cached=True, guide=guide)
    finally:
        p.sampler.denoise_step = orig
    sig = p.sampler.schedule()
    assert len(seen) == p.num_steps
    for i, x in seen:
        c_in = 1 / (sig[i] ** 2 + 0.25).sqrt()
        assert torch.allclose(x[0, :3] * c_in, known[0, :3], atol=1e-5)            # frozen: clean
        assert not torch.allclose(x[0, 3:6] * c_in, known[0, 3:6], atol=1e-3)      # overlap: noised, blended
        assert torch.isfinite(x).all() and float(w[3:6].max()) < 1
    zero = prefix_guide([ChunkPrefix(known[0, :6].numpy(), 0, decay="hard")], lambda a: a, noise,
                        p.sampler.schedule(), 0.5, clean=True)
    assert torch.equal(p.sample_normalized(None, goal, st, noise, cached=True, guide=zero), plain)
