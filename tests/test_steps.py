"""Across denoising steps: schedules, the step-aware runtime, feature caching as a graph cut, DaTo.

References are written here: a shallow step is checked against the original UNet run eagerly with a forward hook
that injects the cached tensor at the cut; DaTo against the official-style plan (tests/reference.py) driven by
dynamics computed in the test.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import models
from graphprune.methods import DaToConfig, DeepCacheConfig, parse_options
from graphprune.methods import registered_methods
from graphprune.passes.cut import find_cut
from graphprune.runtime import runtimes
from graphprune.schedule import DATO_S_A, DATO_S_B, build_schedule, deepcache_nonuniform
from helpers import compile_steps, rel_err
from reference import hooked_unet, install_reference, ref_sito

TIMESTEPS = [int(t) for t in torch.linspace(999, 0, 6).long()]


@pytest.fixture(scope="module")
def tiny():
    model = models.unet(models.SD15_TINY)
    (sample, _, ctx), _ = models.unet_inputs(model, 16)
    return model, sample, ctx


def step(fast, sample, t, ctx, **kw):
    return fast(sample, torch.tensor(t), ctx, **kw).sample



# ----------------------------------------------------------------------------------------------- schedules
def test_uniform_schedule_and_default_interval():
    assert build_schedule(DeepCacheConfig(cache_interval=3)).kinds_for(7) == (
        "full", "shallow", "shallow", "full", "shallow", "shallow", "full")
    assert build_schedule(DeepCacheConfig()).interval == 3
    assert build_schedule(DeepCacheConfig(cache_interval=1)).kinds_for(4) == ("full",) * 4


def _quad_center_reference(total, n, center, power):
    """DeepCache's sample_from_quad_center, written out (Python's complex power of the negative endpoint)."""
    while power > 1:
        xs = np.linspace((-center) ** (1 / power), (total - center) ** (1 / power), n + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = [0] + [int(x) + center for x in np.unique((xs ** power).astype(np.int32))[1:-1]]
        if len(idx) == n:
            return idx
        power -= 0.02
    raise AssertionError


@pytest.mark.parametrize("steps,interval", [(50, 5), (50, 3), (25, 2), (20, 4)])
def test_deepcache_nonuniform_schedule(steps, interval):
    full = deepcache_nonuniform(steps, interval)
    assert full == sorted(_quad_center_reference(steps, math.ceil(steps / interval), 15, 1.4))
    kinds = build_schedule(DeepCacheConfig(schedule="deepcache-nonuniform", cache_interval=interval,
                                           num_steps=steps)).kinds
    assert [i for i, k in enumerate(kinds) if k == "full"] == full and len(kinds) == steps


def test_dato_presets():
    plms = build_schedule(DaToConfig(schedule="dato-imagenet")).kinds
    assert len(plms) == 51 and (plms.count("full"), plms.count("shallow"), plms.count("reuse")) == (5, 21, 25)
    coco = build_schedule(DaToConfig(schedule="dato-coco")).kinds
    assert (coco.count("full"), coco.count("shallow"), coco.count("reuse")) == (6, 38, 7)
    code = {0: "reuse", 1: "shallow"}
    assert coco == ("full",) + tuple(code.get(v, "full") for v in DATO_S_B)
    ddim = build_schedule(DaToConfig(schedule="dato-imagenet", num_steps=50)).kinds
    assert ddim == ("full",) + tuple(code.get(v, "full") for v in DATO_S_A[1:])


@pytest.mark.parametrize("options,match", [
    ({"method": "deepcache", "ratio": 0.3}, "does not prune"),
    ({"method": "deepcache", "schedule": ["full", "skip"]}, "unknown step kind"),
    ({"method": "deepcache", "schedule": ["shallow", "full"]}, "first step"),
    ({"method": "deepcache", "schedule": ["full", "shallow"], "num_steps": 3}, "2 steps but num_steps=3"),
    ({"method": "deepcache", "schedule": ["full"], "cache_interval": 2}, "not both"),
    ({"method": "deepcache", "schedule": "deepcache-nonuniform"}, "needs num_steps"),
    ({"method": "deepcache", "schedule": "fast"}, "unknown schedule"),
    ({"method": "dato", "schedule": "dato-coco", "num_steps": 30}, "must be 51"),
    ({"method": "dato", "cache_interval": 0}, "cache_interval"),
    ({"method": "dato", "cache_branch": -1}, "cache_branch"),
    ({"method": "dato", "selection": "best"}, "selection"),
    ({"method": "dato", "ratio": 0.8}, "ratio"),
    ({"method": "dato", "interval": 3}, "unknown option"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_list_schedule_past_its_end_is_a_clear_error(tiny):
    model, sample, ctx = tiny
    fast, _ = compile_steps(model, method="deepcache", schedule=["full", "shallow"])
    step(fast, sample, 999, ctx)
    step(fast, sample, 800, ctx)
    with pytest.raises(RuntimeError, match="covers 2 UNet calls"):
        step(fast, sample, 600, ctx)


# ----------------------------------------------------------------------------------------------- the cut
@pytest.mark.parametrize("config,latent,resnet", [
    (models.SD15_TINY, 16, "up_blocks.1.resnets.1"),
    (models.SD2_TINY, 16, "up_blocks.1.resnets.1"),
    (models.SDXL_TINY, 16, "up_blocks.2.resnets.1"),
])
def test_cut_is_found_from_module_structure(config, latent, resnet):
    model = models.unet(config)
    args, kwargs = models.unet_inputs(model, latent)
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(*args, **kwargs)
    cut = find_cut(graphs[0].graph, 0)
    assert cut.resnet == resnet and cut.branches == 2 * len(config["up_block_types"])
    assert cut.shape[0] == 2 and cut.shape[2:] == (latent, latent)
    deeper = find_cut(graphs[0].graph, 2)
    assert deeper.shape[2] < latent  # branch 2 cuts inside the next coarser up block
    from graphprune.passes.cut import CutError
    with pytest.raises(CutError, match="valid branches"):
        find_cut(graphs[0].graph, cut.branches)


def test_interval_one_equals_the_unpruned_unet_at_every_step(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="deepcache", cache_interval=1)
    for t in TIMESTEPS:
        assert torch.equal(step(fast, sample, t, ctx), model(sample, torch.tensor(t), ctx).sample)
    assert made[0].kinds == ["full"] * len(TIMESTEPS)


def test_shallow_step_equals_hooked_reference_and_reuse_repeats(tiny):
    model, sample, ctx = tiny
    g = torch.Generator().manual_seed(3)
    samples = [sample + 0.1 * torch.randn(sample.shape, generator=g) for _ in range(3)]
    fast, made = compile_steps(model, method="deepcache", schedule=["full", "shallow", "reuse"])
    out0 = step(fast, samples[0], 999, ctx)
    ref0, feature = hooked_unet(model, samples[0], 999, ctx)
    assert torch.equal(out0, ref0)
    out1 = step(fast, samples[1], 666, ctx)
    ref1, _ = hooked_unet(model, samples[1], 666, ctx, cached=feature)
    full1 = model(samples[1], torch.tensor(666), ctx).sample
    torch.testing.assert_close(out1, ref1, rtol=1e-5, atol=1e-6)
    assert rel_err(out1, full1) > 1e-3  # a shallow step is not a full step
    out2 = step(fast, samples[2], 333, ctx)
    assert torch.equal(out2, out1)
    rt = made[0]
    assert rt.kinds == ["full", "shallow", "reuse"]
    shallow = rt.variants[("shallow", 0.0)]
    assert not any(m.startswith(("mid_block", "down_blocks.1")) for m in shallow.modules)
    assert "up_blocks.1.resnets.1" in shallow.modules and "up_blocks.1.resnets.0" not in shallow.modules


def test_new_generation_on_rising_timestep_and_plms_repeat(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="deepcache", cache_interval=3)
    for t in [999, 979, 979, 959, 939]:  # PNDM repeats a timestep at its start: the same generation
        step(fast, sample, t, ctx)
    rt = made[0]
    assert rt.kinds == ["full", "shallow", "shallow", "full", "shallow"] and rt.generation == 0
    step(fast, sample, 999, ctx)
    assert rt.generation == 1 and rt.kinds == ["full"] and rt.previous_kinds[0] == "full"
    import graphprune

    assert graphprune.reset(fast) == 1 and rt.step == 0 and rt.state_bytes() == 0


def test_two_generations_identical_and_no_recompiles(tiny):
    model, sample, ctx = tiny
    calls = []
    from graphprune.backend import graphprune_backend

    def backend(gm, ex):
        calls.append(1)
        return graphprune_backend(gm, ex, options={"method": "dato", "cache_interval": 3, "compiler": "eager"})

    fast = torch.compile(model, backend=backend)
    timesteps = torch.linspace(999, 1, 50).long()
    torch._dynamo.utils.counters.clear()
    runs = []
    for _ in range(2):
        outs = [step(fast, sample, int(t), ctx) for t in timesteps]
        runs.append(outs)
        if len(runs) == 1:
            variants_after_first = dict(runtimes(fast)[0].variants) if runtimes(fast) else None
    assert len(calls) == 1
    assert sum(torch._dynamo.utils.counters["recompiles"].values()) == 0
    rt = [r for r in runtimes(fast)][0]
    assert rt.variants == variants_after_first and len(rt.variants) == 2
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert rt.generation == 1 and rt.kinds.count("full") == 17


def test_no_graph_breaks(tiny):
    model, sample, ctx = tiny
    explanation = torch._dynamo.explain(model)(sample, torch.tensor(999), ctx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_user_rng_stream_untouched(tiny):
    model, sample, ctx = tiny
    fast, _ = compile_steps(model, method="dato", cache_interval=2)
    state = torch.random.get_rng_state()
    for t in TIMESTEPS:
        step(fast, sample, t, ctx)
    assert torch.equal(state, torch.random.get_rng_state())


def test_inspect_reports_cut_variants_and_state_bytes(tiny):
    import graphprune

    model, sample, ctx = tiny
    report = graphprune.inspect(model, sample, torch.tensor(999), ctx, options={"method": "dato"})
    (rt,) = report.runtimes
    assert rt["cut"]["resnet"] == "up_blocks.1.resnets.1" and len(rt["variants"]) == 2
    full, shallow = rt["variants"]
    assert full["pruned_sites"] == 3 and shallow["pruned_sites"] == 1 and full["budgets"] == [(256, 154)]
    assert rt["state_bytes"] == 0  # a dry run: no call ran, nothing is held
    # once running: DaTo's two previous predictions (the output's shape) + the cached feature (2, 32, 16, 16)
    assert rt["carried_bytes_per_context"] == 2 * sample.numel() * 4 + 2 * 32 * 16 * 16 * 4
    assert "variant shallow" in str(report)
    fast, _ = compile_steps(model, method="deepcache")
    step(fast, sample, 999, ctx)
    live = graphprune.inspect(fast)
    assert len(live.runtimes) == 1 and live.runtimes[0]["variants"][0]["calls"] == 1


# ----------------------------------------------------------------------------------------------- DaTo
def test_dato_plan_equals_official_style_reference():
    impl = registered_methods()["dato"]
    cfg = DaToConfig(ratio=0.4, noise_alpha=0.0, random_sign=False, gamma=1.0)
    from graphprune.methods import SiteGeometry

    g = torch.Generator().manual_seed(0)
    for H, W in [(8, 8), (6, 10), (7, 9)]:
        geo = SiteGeometry(B=4, N=H * W, C=16, H=H, W=W)
        metric = torch.randn(4, geo.N, 16, generator=g)
        e1, e2 = torch.randn(4, 4, H, W, generator=g), torch.randn(4, 4, H, W, generator=g)
        keep, slot = impl.plan(cfg, geo, metric, e1, e2)
        d = (e1 - e2).abs().mean(1).flatten(1)
        prune, recover, kept = ref_sito(metric, H, W, 0.4, score=d, align_cfg=True)
        assert keep.shape == (4, geo.N - int(geo.N * 0.4))
        assert torch.equal(keep.sort(1).values, kept.sort(1).values)
        x = torch.randn(4, geo.N, 5, generator=g)
        assert torch.equal(impl.restore(cfg, (keep, slot), impl.reduce(cfg, (keep, slot), x)), recover(prune(x)))


def test_dato_ratio_zero_interval_one_is_the_unpruned_unet(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="dato", ratio=0.0, cache_interval=1)
    for t in TIMESTEPS[:3]:
        assert torch.equal(step(fast, sample, t, ctx), model(sample, torch.tensor(t), ctx).sample)


def test_dato_prunes_static_k_at_each_site(tiny):
    model, sample, ctx = tiny
    fast, made = compile_steps(model, method="dato", ratio=0.4, cache_interval=2)
    for t in TIMESTEPS[:2]:
        step(fast, sample, t, ctx)
    rt = made[0]
    K = 256 - int(256 * 0.4)
    for kind, n_sites in (("full", 3), ("shallow", 1)):
        gm = rt.variants[(kind, 0.4)].gm
        attn = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_attention"]
        assert len(attn) == n_sites
        assert all(tuple(n.args[0].meta["example_value"].shape) == (2, K, 32) for n in attn)


def test_dato_full_steps_equal_eager_reference_with_dynamics(tiny):
    """Interval 1 (every step full), no noise, fixed sign: each step's base tokens come from the dynamics of the two
    previous outputs; the reference computes them itself from its own previous outputs."""
    model, sample, ctx = tiny
    gamma = 1.0
    fast, _ = compile_steps(model, method="dato", ratio=0.4, cache_interval=1, noise_alpha=0.0, random_sign=False,
                            gamma=gamma)
    import copy

    ref_model = install_reference(copy.deepcopy(model), "dato", 0.4, gamma=gamma)
    state = ref_model.reference_state
    history = []
    for t in TIMESTEPS[:4]:
        prev = history[-1] if history else torch.zeros_like(sample)
        prev2 = history[-2] if len(history) > 1 else prev
        state["dynamics"] = (prev - prev2).abs().mean(1).flatten(1)
        ref = ref_model(sample, torch.tensor(t), ctx).sample
        out = step(fast, sample, t, ctx)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        history.append(ref)
    assert rel_err(out, model(sample, torch.tensor(TIMESTEPS[3]), ctx).sample) > 1e-4  # pruning happened


def test_dato_non_square_latent_and_odd_batch():
    model = models.unet(models.SD15_TINY)
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(3, 4, 16, 24, generator=g), torch.randn(3, 7, 32, generator=g)
    fast, made = compile_steps(model, method="dato", cache_interval=2)
    for t in TIMESTEPS[:3]:
        out = step(fast, sample, t, ctx)
        assert torch.isfinite(out).all()
    pruned = made[0].variants[("full", 0.4)].report.pruned
    assert len(pruned) == 3 and all(s.K == 384 - int(384 * 0.4) for s in pruned)


def test_dato_on_sdxl_style_unet_prunes_its_finest_level():
    model = models.unet(models.SDXL_TINY)
    args, kwargs = models.unet_inputs(model, 16)
    fast, made = compile_steps(model, method="dato", cache_interval=2)
    for t in TIMESTEPS[:2]:
        out = fast(args[0], torch.tensor(t), args[2], **kwargs).sample
        assert torch.isfinite(out).all()
    rt = made[0]
    assert [s.grid for s in rt.variants[("full", 0.4)].report.pruned] == [(8, 8)] * 6
    assert rt.variants[("shallow", 0.4)].report.pruned == []  # the last up stage has no attention on SDXL


def test_step_aware_method_on_a_dit_is_a_clear_error():
    model = models.pixart()
    args, kwargs = models.pixart_inputs()
    fast, _ = compile_steps(model, method="deepcache")
    with pytest.raises(Exception, match="U-Net"):
        fast(*args, **kwargs)


@pytest.mark.slow
def test_dato_inductor_matches_eager_runtime(tiny):
    model, sample, ctx = tiny
    outs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        fast, _ = compile_steps(model, method="dato", cache_interval=2, compiler=compiler)
        outs[compiler] = [step(fast, sample, t, ctx) for t in TIMESTEPS[:3]]
    for a, b in zip(outs["eager"], outs["inductor"]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_dato_preset_compiles_with_inlined_cacheable_graphs_under_inductor(tiny):
    """Regression (issue 17): with DaTo's graphs inlined, the S_A preset's first Inductor compile broke Dynamo's guard
    building (IndexError in produce_guards): the step runtime's zero state inputs became dynamic size symbols with no
    source. Its graphs now compile with no AOTAutograd cache bypass and match the eager compiler."""
    from torch._dynamo.utils import counters

    model, sample, ctx = tiny
    timesteps = [int(t) for t in torch.linspace(981, 1, 50).long()][:3]
    outs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        before = counters["aot_autograd"]["autograd_cache_bypass"]
        fast, _ = compile_steps(model, method="dato", schedule="dato-imagenet", compiler=compiler)
        outs[compiler] = [step(fast, sample, t, ctx) for t in timesteps]
    assert counters["aot_autograd"]["autograd_cache_bypass"] == before
    for a, b in zip(outs["eager"], outs["inductor"]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------- peers, pipelines
def test_deepcache_equals_the_deepcache_package(tiny):
    """Parity with DeepCache's own helper (pip package DeepCache, DeepCacheSDHelper, branch 0, uniform interval)."""
    DeepCacheSDHelper = pytest.importorskip("DeepCache").DeepCacheSDHelper
    import copy
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    model, sample, ctx = tiny
    sched = DDIMScheduler()
    sched.set_timesteps(7)
    peer = copy.deepcopy(model)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=peer, scheduler=sched))
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    fast, made = compile_steps(model, method="deepcache", cache_interval=3)
    g = torch.Generator().manual_seed(5)
    try:
        for t in sched.timesteps:
            x = sample + 0.2 * torch.randn(sample.shape, generator=g)
            torch.testing.assert_close(fast(x, t, ctx).sample, peer(x, t, ctx).sample, rtol=1e-5, atol=1e-6)
    finally:
        helper.disable()
    assert made[0].kinds == ["full", "shallow", "shallow"] * 2 + ["full"]


def tiny_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=models.unet(models.SD15_TINY),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_apply_and_remove_on_a_pipeline():
    import graphprune

    pipe = tiny_pipeline()
    original_unet, original_class = pipe.unet, type(pipe)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=6, height=16, width=16,
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    baseline = generate()
    with pytest.raises(ValueError, match="unknown option"):
        graphprune.apply(pipe, method="dato", interval=2)
    graphprune.apply(pipe, method="deepcache", cache_interval=2, compiler="eager")
    assert pipe.unet is not original_unet and pipe.unet.config.in_channels == 4
    first, second = generate(), generate()
    assert torch.equal(first, second)  # state is reset per call: no leak between images
    assert 1e-4 < rel_err(first, baseline) < 0.5
    (rt,) = graphprune.runtimes(pipe)
    assert rt.previous_kinds == ["full", "shallow"] * 3 and rt.generation >= 1
    graphprune.remove(pipe)
    assert pipe.unet is original_unet and type(pipe) is original_class
    assert torch.equal(generate(), baseline)


def test_apply_with_an_adaptive_policy_resets_per_image():
    import graphprune

    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=5, height=16, width=16,
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    graphprune.apply(pipe, method="deepcache", policy="first-block", threshold=0.3, compiler="eager")
    first, second = generate(), generate()
    assert torch.equal(first, second)
    (rt,) = graphprune.runtimes(pipe)
    kinds = rt.previous_kinds or rt.kinds
    assert kinds[0] == "full" and len(kinds) == 5 and [r.kind for r in rt.records] == kinds
    assert "first-block" in str(graphprune.inspect(pipe.unet))
    graphprune.remove(pipe)
