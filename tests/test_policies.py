"""Adaptive step policies (first-block, magcache), the Taylor forecast and CFG cache contexts.

References are written here: the UNet run eagerly with hooks (the first down stage's output for the probe's
scalar, the cut feature injected at the last up-path ResNet for shallow steps), MagCache's and First Block Cache's
rules as plain loops, and a hand-written U-Net whose cached feature is linear in the step index (Taylor order 1).
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from graphprune.methods import parse_options
from helpers import compile_steps, rel_err
from reference import hooked_unet

TIMESTEPS = [int(t) for t in torch.linspace(999, 50, 10).long()]


@pytest.fixture(scope="module")
def tiny():
    model = models.unet(models.SD15_TINY)
    (sample, _, ctx), _ = models.unet_inputs(model, 16)
    return model, sample, ctx



def trajectory(sample, n=len(TIMESTEPS), seed=3):
    """Latents that change from call to call as in a sampler (fixed, so references see the same inputs)."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(sample.shape, generator=g)
    return [sample + 0.05 * i * drift for i in range(n)]


def run(fast, xs, ctx, timesteps=TIMESTEPS):
    return [fast(x, torch.tensor(t), ctx).sample for x, t in zip(xs, timesteps)]


def down0_output(model, sample, t, ctx):
    """The first down stage's output hidden state (what the probe measures), eagerly with a forward hook."""
    seen = {}

    def hook(module, args, out):
        seen["p"] = out[0].clone()

    handle = model.down_blocks[0].register_forward_hook(hook)
    try:
        model(sample, torch.tensor(t), ctx)
    finally:
        handle.remove()
    return seen["p"]


def fbc_reference(model, xs, ctx, threshold, max_skips=None, accumulate=True):
    """First Block Cache on the eager UNet: kinds, signals and outputs (shallow = cut feature of the last full)."""
    kinds, signals, outs = [], [], []
    ref = feature = None
    acc, skips = 0.0, 0
    for x, t in zip(xs, TIMESTEPS):
        p = down0_output(model, x, t, ctx)
        signal = None if ref is None else float((p - ref).abs().mean() / ref.abs().mean())
        compared = None if signal is None else (acc + signal if accumulate else signal)
        if compared is not None and compared < threshold and (max_skips is None or skips < max_skips):
            acc, skips = compared, skips + 1
            out, _ = hooked_unet(model, x, t, ctx, cached=feature)
            kinds.append("shallow")
        else:
            acc, skips, ref = 0.0, 0, p
            out, feature = hooked_unet(model, x, t, ctx)
            kinds.append("full")
        signals.append(signal)
        outs.append(out)
    return kinds, signals, outs


# ----------------------------------------------------------------------------------------------- first-block
def test_first_block_threshold_zero_equals_the_unet_at_every_step(tiny):
    model, sample, ctx = tiny
    xs = trajectory(sample)
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=0.0)
    for out, x, t in zip(run(fast, xs, ctx), xs, TIMESTEPS):
        assert torch.equal(out, model(x, torch.tensor(t), ctx).sample)
    rt = made[0]
    assert rt.kinds == ["full"] * len(TIMESTEPS)
    assert sorted(k for k, _ in rt.variants) == ["full", "probe"]  # the probe and the full remainder
    assert all(r.signal is not None and r.signal > 0 for r in rt.records[1:])


def test_first_block_huge_threshold_is_max_skips_bounded_shallow_steps(tiny):
    model, sample, ctx = tiny
    xs = trajectory(sample)
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=1e9, max_skips=3)
    outs = run(fast, xs, ctx)
    kinds, _, refs = fbc_reference(model, xs, ctx, threshold=1e9, max_skips=3)
    assert made[0].kinds == kinds == ["full", "shallow", "shallow", "shallow"] * 2 + ["full", "shallow"]
    for out, ref, x, t, kind in zip(outs, refs, xs, TIMESTEPS, kinds):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        if kind == "shallow":  # really the cached feature, not a full step
            assert rel_err(out, model(x, torch.tensor(t), ctx).sample) > 1e-4
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=1e9)
    run(fast, xs, ctx)
    assert made[0].kinds == ["full"] + ["shallow"] * (len(TIMESTEPS) - 1)  # no limit: FBCache's default


@pytest.mark.parametrize("accumulate", [True, False])
def test_probe_scalar_and_decisions_equal_the_eager_reference(tiny, accumulate):
    """The probe's scalar is mean|p - p_full| / mean|p_full| of the first down stage's output; the decisions follow
    the accumulated (or, accumulate=False, per-step: diffusers' FBCache) rule; outputs follow the decisions."""
    model, sample, ctx = tiny
    xs = trajectory(sample)
    threshold = 0.12 if accumulate else 0.1
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=threshold,
                               accumulate=accumulate)
    outs = run(fast, xs, ctx)
    kinds, signals, refs = fbc_reference(model, xs, ctx, threshold, accumulate=accumulate)
    rt = made[0]
    assert rt.kinds == kinds and "shallow" in kinds and kinds.count("full") > 1
    assert rt.records[0].signal is None
    for record, signal in zip(rt.records[1:], signals[1:]):
        assert record.signal == pytest.approx(signal, rel=1e-5)
        assert record.threshold == threshold
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_first_block_graphs_are_static_and_split_at_the_first_down_stage(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=0.1)
    run(fast, trajectory(sample, 4), ctx, TIMESTEPS[:4])
    rt = made[0]
    probe, full = rt.variants[("probe", 0.0)], rt.variants[("full", 0.0)]
    assert {m.split(".")[0] for m in probe.modules} == {"time_proj", "time_embedding", "conv_in", "down_blocks"}
    assert all(m.startswith("down_blocks.0") for m in probe.modules if m.startswith("down_blocks"))
    assert not any(m.startswith(("conv_in", "time_", "down_blocks.0")) for m in full.modules)
    assert any(m.startswith("down_blocks.1") for m in full.modules)
    assert all(name.startswith("graphprune_probe_") for name in full.inputs)
    assert probe.inputs == ["graphprune_probe_ref"]
    if ("shallow", 0.0) in rt.variants:
        shallow = rt.variants[("shallow", 0.0)]
        assert not any(m.startswith(("conv_in", "down_blocks", "mid_block")) for m in shallow.modules)


@pytest.mark.parametrize("config,batch,latent", [(models.SD2_TINY, 1, (16, 24)), (models.SDXL_TINY, 3, (16, 16))])
def test_first_block_on_sd2_and_sdxl_style_unets(config, batch, latent):
    """SD2-style (linear proj_in, per-block heads) and SDXL-style (no attention in the first stage, text_time
    embeddings in the probe) UNets, odd batches, a non-square latent: threshold 0 is the UNet, a huge one caches."""
    model = models.unet(config)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, *latent, generator=g)
    _, kwargs = models.unet_inputs(model, 16, batch=batch)
    ctx = torch.randn(batch, 7, model.config.cross_attention_dim, generator=g)
    xs = trajectory(sample, 4)
    for threshold, expected in ((0.0, ["full"] * 4), (1e9, ["full", "shallow", "full", "shallow"])):
        torch._dynamo.reset()
        fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=threshold, max_skips=1,
                                   forecast="taylor")
        for x, t in zip(xs, TIMESTEPS):
            out = fast(x, torch.tensor(t), ctx, **kwargs).sample
            ref = model(x, torch.tensor(t), ctx, **kwargs).sample
            if threshold == 0:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert made[0].kinds == expected and made[0].probe.shape[0] == batch


# ----------------------------------------------------------------------------------------------- Taylor
def test_taylor_order_zero_equals_reuse_exactly(tiny):
    model, sample, ctx = tiny
    xs = trajectory(sample)
    plain, _ = compile_steps(model, method="deepcache", cache_interval=3)
    expected = run(plain, xs, ctx)
    torch._dynamo.reset()
    taylor, made = compile_steps(model, method="deepcache", cache_interval=3, forecast="taylor", order=0)
    for a, b in zip(run(taylor, xs, ctx), expected):
        assert torch.equal(a, b)
    assert made[0].variants[("shallow", 0.0)].inputs == ["graphprune_cache"]  # no forecast op at all


class _Res(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return F.silu(self.conv(x))


class _Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([_Res(2 * c, c)])

    def forward(self, hidden, skip):  # as diffusers' up blocks: cat([hidden, skip]) into each ResNet
        return self.resnets[0](torch.cat([hidden, skip], dim=1))


class LinearDeepUNet(nn.Module):
    """A U-Net whose deep path is affine in (sample, timestep): the feature cached at the cut is then linear in the
    step index when the sample and the timestep are. Module names follow diffusers (time_proj, conv_in,
    down_blocks, up_blocks.<i>.resnets.<j> reading cat([hidden, skip]))."""

    def __init__(self, c=8):
        super().__init__()
        self.time_proj = nn.Linear(1, c)
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.down_blocks = nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)])
        self.mid = nn.Conv2d(c, c, 1)
        self.up_blocks = nn.ModuleList([_Up(c)])
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, sample, timestep):
        emb = self.time_proj(timestep.reshape(1, 1).to(sample.dtype) / 1000)
        skip = self.conv_in(sample)
        h = self.mid(self.down_blocks[0](skip)) + emb[:, :, None, None]
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.conv_out(self.up_blocks[0](h, skip))


def test_taylor_order_one_is_exact_on_a_feature_linear_in_the_step_index():
    torch.manual_seed(0)
    model = LinearDeepUNet().double().eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    steps = 9
    xs = [a + k * b for k in range(steps)]
    ts = [900 - 60 * k for k in range(steps)]  # linear in k too
    outs = {}
    for forecast in ("none", "taylor"):
        torch._dynamo.reset()
        fast, made = compile_steps(model, method="deepcache", cache_interval=3, forecast=forecast,
                                   **({"order": 1} if forecast == "taylor" else {}))
        outs[forecast] = [fast(x, torch.tensor(t)) for x, t in zip(xs, ts)]
        assert made[0].kinds == ["full", "shallow", "shallow"] * 3
    for k, (x, t) in enumerate(zip(xs, ts)):
        ref = model(x, torch.tensor(t))
        taylor, reuse = outs["taylor"][k], outs["none"][k]
        if k % 3 == 0:  # full steps
            torch.testing.assert_close(taylor, ref, rtol=1e-12, atol=1e-12)
        elif k < 3:  # one full step so far: no derivative yet, the forecast is the cached feature
            assert torch.equal(taylor, reuse) and rel_err(taylor, ref) > 1e-3
        else:  # F0 + k * (F0 - F0_prev) / 3 is the feature itself
            torch.testing.assert_close(taylor, ref, rtol=1e-10, atol=1e-10)
            assert rel_err(reuse, ref) > 1e-3


def test_taylor_forecast_equals_finite_differences_of_the_eager_feature(tiny):
    """Order 2 on the real UNet: each shallow step's output equals the UNet run with the feature F0 + k F1 + k^2/2
    F2 from TaylorSeer's divided differences of the features of the previous full steps, computed here."""
    model, sample, ctx = tiny
    xs = trajectory(sample)
    fast, made = compile_steps(model, method="deepcache", cache_interval=2, forecast="taylor", order=2)
    outs = run(fast, xs, ctx)
    factors, last = [], None
    for i, (x, t) in enumerate(zip(xs, TIMESTEPS)):
        if i % 2 == 0:
            ref, feature = hooked_unet(model, x, t, ctx)
            new = [feature]
            for j in range(2):
                if last is None or j >= len(factors):
                    break
                new.append((new[j] - factors[j]) / (i - last))
            factors, last = new, i
        else:
            k = i - last
            forecast = factors[0] + sum(f * k ** j / (1 if j == 1 else 2) for j, f in enumerate(factors[1:], 1))
            ref, _ = hooked_unet(model, x, t, ctx, cached=forecast)
        torch.testing.assert_close(outs[i], ref, rtol=1e-4, atol=1e-5)
    assert made[0].kinds == ["full", "shallow"] * 5


# ----------------------------------------------------------------------------------------------- magcache
def magcache_reference(ratios, budget, max_skips, warmup):
    """MagCache's rule (official code / diffusers' MagCacheHeadHook) as a plain loop -> (kinds, errors)."""
    kinds, errors = [], []
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    for i, r in enumerate(ratios):
        err = None
        if i >= max(warmup, 1):
            acc_ratio *= r
            acc_steps += 1
            acc_err += abs(1 - acc_ratio)
            err = acc_err
            if acc_err <= budget and acc_steps <= max_skips:
                kinds.append("shallow")
                errors.append(err)
                continue
            acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        kinds.append("full")
        errors.append(err)
    return kinds, errors


def cut_features(model, xs, ctx):
    return [hooked_unet(model, x, t, ctx)[1] for x, t in zip(xs, TIMESTEPS)]


@pytest.fixture(scope="module")
def calibration_file(tiny, tmp_path_factory):
    import graphprune

    model, sample, ctx = tiny
    xs = trajectory(sample, seed=7)
    calib = graphprune.calibrate(model, lambda fast: run(fast, xs, ctx), loop={"num_steps": len(xs)})
    path = calib.save(tmp_path_factory.mktemp("calib") / "calib.json")
    return path, calib, xs


def test_calibration_ratios_equal_the_eager_features(tiny, calibration_file):
    model, _, ctx = tiny
    path, calib, xs = calibration_file
    feats = cut_features(model, xs, ctx)
    expected = [1.0] + [float((f.norm(dim=1) / (p.norm(dim=1) + 1e-8)).mean()) for p, f in zip(feats, feats[1:])]
    assert calib.ratios["batch"] == pytest.approx(expected, rel=1e-5)
    blob = json.loads(path.read_text())
    assert blob["format"] == "graphprune-magcache" and blob["version"] == 1 and blob["cfg"] == "batch"
    assert blob["cut"] == {"cache_branch": 0, "resnet": "up_blocks.1.resnets.1"}
    assert blob["model"]["parameters"] == len(list(model.parameters())) and blob["model"]["config"]["sample_size"] == 16


def test_magcache_reproduces_the_calibrated_schedule(tiny, calibration_file):
    import graphprune

    model, sample, ctx = tiny
    path, calib, _ = calibration_file
    budget, skips = 0.2, 2
    kinds, errors = magcache_reference(calib.ratios["batch"], budget, skips, warmup=0)
    assert "shallow" in kinds and kinds.count("full") > 1
    xs = trajectory(sample)  # another trajectory than the calibration's: the schedule does not depend on it
    options = dict(method="deepcache", policy="magcache", calibration=str(path), error_budget=budget,
                   max_skips=skips, retention_ratio=0.0)
    from graphprune.policy import build_policy

    assert list(build_policy(parse_options(options)).kinds_for(len(xs))) == kinds  # known before any call
    fast, made = compile_steps(model, **options)
    outs = run(fast, xs, ctx)
    rt = made[0]
    assert rt.kinds == kinds
    assert [r.accumulated for r in rt.records] == pytest.approx(errors)
    feature = None
    for out, x, t, kind in zip(outs, xs, TIMESTEPS, kinds):
        ref, f = hooked_unet(model, x, t, ctx, cached=None if kind == "full" else feature)
        feature = f if kind == "full" else feature
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert "magcache" in str(graphprune.inspect(fast)) and "accumulated" in str(graphprune.inspect(fast))
    # the defaults: MagCache's retention 0.2 (first int(0.2 n + 0.5) calls full), K = 3, budget 0.06
    torch._dynamo.reset()
    fast, made = compile_steps(model, method="deepcache", policy="magcache", calibration=calib.to_dict())
    expected, _ = magcache_reference(calib.ratios["batch"], 0.06, 3, warmup=int(0.2 * len(xs) + 0.5))
    run(fast, xs, ctx)
    assert made[0].kinds == expected


def test_magcache_resamples_a_calibration_to_num_steps(calibration_file):
    from graphprune.calibration import nearest_interp

    _, calib, _ = calibration_file
    config = parse_options({"method": "deepcache", "policy": "magcache", "calibration": calib.to_dict(),
                            "num_steps": 25, "retention_ratio": 0.0})
    from graphprune.policy import build_policy

    policy = build_policy(config)
    ratios = calib.ratios["batch"]
    idx = [int(round(i * (len(ratios) - 1) / 24)) for i in range(25)]  # MagCache's nearest_interp (np.round)
    assert list(policy.ratios) == [ratios[i] for i in idx] == nearest_interp(ratios, 25)
    assert policy.length == 25


# ----------------------------------------------------------------------------------------------- generations, CFG
@pytest.mark.parametrize("options", [
    {"method": "deepcache", "policy": "first-block", "threshold": 0.15, "forecast": "taylor", "order": 2},
    {"method": "dato", "policy": "first-block", "threshold": 0.15, "max_skips": 2},
    {"method": "dato", "policy": "magcache", "error_budget": 0.2, "forecast": "taylor"},
])
def test_two_generations_identical_no_recompile_state_reset(tiny, calibration_file, options):
    model, sample, ctx = tiny
    if options["policy"] == "magcache":
        options = {**options, "calibration": str(calibration_file[0])}
    calls = []
    from graphprune.backend import graphprune_backend

    def backend(gm, ex):
        calls.append(1)
        return graphprune_backend(gm, ex, options={**options, "compiler": "eager"})

    fast = torch.compile(model, backend=backend)
    xs = trajectory(sample)
    torch._dynamo.utils.counters.clear()
    first = run(fast, xs, ctx)
    rt = __import__("graphprune").runtimes(fast)[0]
    kinds, records, variants = list(rt.kinds), list(rt.records), dict(rt.variants)
    second = run(fast, xs, ctx)  # the timestep rises: a new generation
    assert len(calls) == 1 and sum(torch._dynamo.utils.counters["recompiles"].values()) == 0
    assert rt.generation == 1 and rt.kinds == kinds == rt.previous_kinds and rt.records == records
    assert "shallow" in kinds and rt.variants == variants
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    import graphprune

    graphprune.reset(fast)
    assert rt.state_bytes() == 0 and rt.step == 0


def test_dato_pruning_runs_inside_probe_and_remainders(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="dato", ratio=0.4, policy="first-block", threshold=1e9, max_skips=1,
                               forecast="taylor")
    outs = run(fast, trajectory(sample, 4), ctx, TIMESTEPS[:4])
    rt = made[0]
    assert rt.kinds == ["full", "shallow", "full", "shallow"]
    K = 256 - int(256 * 0.4)
    counts = {kind: len(v.report.pruned) for (kind, _), v in rt.variants.items()}
    assert counts == {"probe": 1, "full": 2, "shallow": 1}  # 3 sites as in dato's full graph, split at the probe
    assert all(s.K == K for v in rt.variants.values() for s in v.report.pruned)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
def test_deepcache_with_a_token_method_under_inductor_equals_the_eager_runtime(tiny):
    """deepcache + prune={"method": "tome"} (the 50-step table's deepcache3+tome0.5, inlined graphs) compiled by
    Inductor gives the eager runtime's outputs at every step."""
    model, sample, ctx = tiny
    xs = trajectory(sample, 5)
    outs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        fast, made = compile_steps(model, method="deepcache", cache_interval=2, compiler=compiler,
                                   prune={"method": "tome", "ratio": 0.5, "use_rand": False})
        outs[compiler] = (run(fast, xs, ctx, TIMESTEPS[:5]), made[0].kinds)
    assert outs["eager"][1] == outs["inductor"][1] and "shallow" in outs["eager"][1]
    for a, b in zip(outs["eager"][0], outs["inductor"][0]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_deepcache_composes_with_a_per_step_token_method(tiny):
    """prune={"method": "tome", ...}: tomesd-style merging inside the probe, the full and the shallow remainders;
    every step equals the reference ToMe UNet (full steps) or that UNet on the cached feature (shallow steps)."""
    import copy

    from reference import install_reference

    model, sample, ctx = tiny
    xs = trajectory(sample, 4)
    fast, made = compile_steps(model, method="deepcache", policy="first-block", threshold=1e9, max_skips=1,
                               prune={"method": "tome", "ratio": 0.5, "use_rand": False})
    outs = run(fast, xs, ctx, TIMESTEPS[:4])
    rt = made[0]
    assert rt.kinds == ["full", "shallow"] * 2
    assert {kind: len(v.report.pruned) for (kind, _), v in rt.variants.items()} == {"probe": 1, "full": 2,
                                                                                     "shallow": 1}
    ref_model = install_reference(copy.deepcopy(model), "tome", 0.5)
    feature = None
    for out, x, t, kind in zip(outs, xs, TIMESTEPS, rt.kinds):
        ref, f = hooked_unet(ref_model, x, t, ctx, cached=feature if kind == "shallow" else None)
        feature = f if kind == "full" else feature
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rel_err(outs[0], model(xs[0], torch.tensor(TIMESTEPS[0]), ctx).sample) > 1e-4  # tome merged tokens


def test_cfg_split_keeps_two_contexts_and_equals_the_batch_row_by_row(tiny):
    """cfg='split' (the UNet called once per CFG half at each timestep): context "0" sees the first call of each
    timestep, "1" the second, each with its own cache; a fixed schedule then gives the batched run's rows."""
    model, sample, ctx = tiny
    xs = trajectory(sample, 6)
    batch, _ = compile_steps(model, method="deepcache", cache_interval=3)
    expected = run(batch, xs, ctx, TIMESTEPS[:6])
    torch._dynamo.reset()
    split, made = compile_steps(model, method="deepcache", cache_interval=3, cfg="split")
    for x, t, ref in zip(xs, TIMESTEPS[:6], expected):
        halves = [split(x[i:i + 1], torch.tensor(t), ctx[i:i + 1]).sample for i in range(2)]
        torch.testing.assert_close(torch.cat(halves), ref, rtol=1e-4, atol=1e-5)  # batch 1 vs 2 reductions
    rt = made[0]
    assert sorted(rt.contexts) == ["0", "1"] and all(c.step == 6 for c in rt.contexts.values())
    assert rt.kinds == [k for k in ["full", "shallow", "shallow"] * 2 for _ in range(2)]
    torch._dynamo.reset()
    split, made = compile_steps(model, method="deepcache", policy="first-block", threshold=0.12, cfg="split")
    for x, t in zip(xs, TIMESTEPS[:6]):
        for i in range(2):
            split(x[i:i + 1], torch.tensor(t), ctx[i:i + 1])
    rt = made[0]
    by_context = {name: [r.signal for r in c.records[1:]] for name, c in rt.contexts.items()}
    for i, name in enumerate(("0", "1")):  # each context's signal is its own half's change
        p = [down0_output(model, x[i:i + 1], t, ctx[i:i + 1]) for x, t in zip(xs, TIMESTEPS[:6])]
        kinds = [r.kind for r in rt.contexts[name].records]
        ref = p[0]
        for j in range(1, 6):
            assert by_context[name][j - 1] == pytest.approx(float((p[j] - ref).abs().mean() / ref.abs().mean()),
                                                            rel=1e-5)
            if kinds[j] == "full":
                ref = p[j]


# ----------------------------------------------------------------------------------------------- errors, CLI
@pytest.mark.parametrize("options,match", [
    ({"policy": "adaptive"}, "policy must be one of"),
    ({"threshold": 0.1}, "threshold is read by policy='first-block'"),
    ({"policy": "first-block", "error_budget": 0.1}, "error_budget is read by policy='magcache'"),
    ({"policy": "first-block", "cache_interval": 3}, "drop schedule/cache_interval"),
    ({"policy": "first-block", "threshold": -1}, "threshold must be a number >= 0"),
    ({"policy": "first-block", "max_skips": 0}, "max_skips must be an integer >= 1"),
    ({"policy": "first-block", "retention_ratio": 0.1}, "needs num_steps"),
    ({"policy": "magcache"}, "graphprune calibrate"),
    ({"forecast": "linear"}, "forecast must be one of"),
    ({"order": 1}, "pass forecast='taylor'"),
    ({"forecast": "taylor", "order": 3}, "order must be 0, 1 or 2"),
    ({"cfg": "halves"}, "cfg must be one of"),
    ({"policy": "magcache", "calibration": "/nonexistent/calib.json"}, "does not exist.*graphprune calibrate"),
    ({"policy": "magcache", "calibration": {"format": "teacache"}}, "not a graphprune MagCache"),
    ({"policy": "magcache", "calibration": {"format": "graphprune-magcache", "version": 9}}, "version 9"),
    ({"policy": "magcache", "calibration": {"format": "graphprune-magcache", "version": 1, "ratios": {"batch": []}}},
     "non-empty list"),
    ({"prune": "tome"}, "options of a per-step token method"),
    ({"prune": {"method": "catome"}}, "works across steps itself"),
    ({"prune": {"method": "tome", "ratio": 0.9}}, "ratio"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options({"method": "deepcache", **options})


def test_mismatched_calibration_is_a_clear_error(calibration_file):
    from graphprune.calibration import CalibrationError

    path, calib, _ = calibration_file
    with pytest.raises(ValueError, match="cache_branch=0.*cache_branch=1"):
        parse_options({"method": "deepcache", "policy": "magcache", "calibration": str(path), "cache_branch": 1})
    with pytest.raises(ValueError, match="cfg='batch'"):
        parse_options({"method": "deepcache", "policy": "magcache", "calibration": str(path), "cfg": "split"})
    other = models.unet(models.SD2_TINY)  # another architecture
    args, kwargs = models.unet_inputs(other, 16)
    fast, _ = compile_steps(other, method="deepcache", policy="magcache", calibration=str(path))
    with pytest.raises(Exception, match="another model.*graphprune calibrate"):  # raised in the backend
        fast(*args, **kwargs)
    reweighted = models.unet(models.SD15_TINY, seed=5)  # same architecture, other weights: a warning
    args, kwargs = models.unet_inputs(reweighted, 16)
    torch._dynamo.reset()
    fast, _ = compile_steps(reweighted, method="deepcache", policy="magcache", calibration=str(path))
    with pytest.warns(UserWarning, match="other weights"):
        fast(*args, **kwargs)


def test_calibrate_command_writes_ratios_and_plot(tmp_path):
    out = tmp_path / "calib.json"
    proc = subprocess.run([sys.executable, "-m", "graphprune.cli", "calibrate", "--arch", "tiny", "--latent", "16",
                           "--steps", "6", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    blob = json.loads(out.read_text())
    assert len(blob["ratios"]["batch"]) == 6 and blob["loop"]["num_steps"] == 6 and blob["ratios"]["batch"][0] == 1
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "wrote" in proc.stdout
    help_text = subprocess.run([sys.executable, "-m", "graphprune.cli", "calibrate", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--cfg" in help_text and "--model" in help_text


@pytest.mark.slow
def test_first_block_with_taylor_under_inductor_equals_the_eager_runtime(tiny):
    """DaTo (inlined graphs: probe, full and shallow remainders; state inputs eps_prev, eps_prev2 and Taylor's) under
    Inductor gives the eager runtime's outputs at every step (inlined, it once read eps_prev2 for eps_prev:
    tests/test_inline.py::test_inputs_sharing_one_meta_value_stay_two_inputs)."""
    model, sample, ctx = tiny
    xs = trajectory(sample, 5)
    outs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        fast, made = compile_steps(model, method="dato", policy="first-block", threshold=0.15, forecast="taylor",
                                   compiler=compiler)
        outs[compiler] = (run(fast, xs, ctx, TIMESTEPS[:5]), made[0].kinds)
    assert outs["eager"][1] == outs["inductor"][1] and "shallow" in outs["eager"][1]
    for a, b in zip(outs["eager"][0], outs["inductor"][0]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
