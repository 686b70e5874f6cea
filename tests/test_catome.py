"""CA-ToMe: threshold merging with a cache of matches across steps.

The reference is the official ``ca-tome`` package itself (installed with ``--no-deps``), patched onto a copy of the
same tiny UNet with ``use_rand=False`` and driven step by step as its pipeline does (``inference_step = i + 1`` on
every transformer block). Per-row semantics are checked against a reference written here.
"""

import copy

import pytest
import torch

import models
from graphprune.methods import CaToMeConfig, parse_options
from graphprune.methods import SiteGeometry, registered_methods
from graphprune.passes.ops import node_val
from graphprune.methods.refresh import build_refresh
from graphprune.runtime import runtimes
from helpers import rel_err

TIMESTEPS = [int(t) for t in torch.linspace(999, 0, 10).long()]


@pytest.fixture(scope="module")
def tiny64():
    """The tiny SD1.5-style UNet in float64 (so that parity is exact to rounding) and its inputs."""
    model = models.unet(models.SD15_TINY).double()
    (sample, _, ctx), _ = models.unet_inputs(model, 16)
    return model, sample.double(), ctx.double()


def compile_catome(model, **options):
    from graphprune.backend import graphprune_backend

    options = {"method": "catome", "compiler": "eager", **options}
    made = []

    def backend(gm, ex):
        made.append(graphprune_backend(gm, ex, options=dict(options)))
        return made[-1]

    return torch.compile(model, backend=backend), made


def official(model, threshold, compute_on):
    """The ca-tome package on a copy of ``model`` (top-left destinations)."""
    apply_patch = pytest.importorskip("ca_tome.patch", reason="pip install --no-deps ca-tome==0.1.3").apply_patch

    ref = copy.deepcopy(model)
    apply_patch(ref, compute_on=list(compute_on), r=threshold, use_rand=False)
    return ref


def run_official(ref, sample, ctx, timesteps=TIMESTEPS):
    """One generation of the official model: the outputs of every step (the latent moves by the prediction)."""
    outs, x = [], sample
    for i, t in enumerate(timesteps):
        for m in ref.modules():
            if hasattr(m, "_cache_info"):
                m.inference_step = i + 1  # the official pipeline's 1-based step number
        with torch.no_grad():
            outs.append(ref(x, torch.tensor(t), ctx).sample)
        x = x - 0.1 * outs[-1]
    return outs


def run_ours(fast, sample, ctx, timesteps=TIMESTEPS):
    outs, x = [], sample
    for t in timesteps:
        with torch.no_grad():
            outs.append(fast(x, torch.tensor(t), ctx).sample)
        x = x - 0.1 * outs[-1]
    return outs


# ----------------------------------------------------------------------------------------------- options
def test_refresh_presets_translate_the_official_1_based_steps():
    assert build_refresh("config3").steps == (0, 7, 10, 12, 19, 24, 29, 34, 44, 45, 46, 47, 48)
    assert build_refresh("every5").refresh_steps(12) == [0, 4, 9]  # official steps 5, 10 = our calls 4, 9
    assert build_refresh(5).refresh_steps(12) == [0, 5, 10]
    assert build_refresh([3, 1]).refresh_steps(5) == [0, 1, 3]
    assert build_refresh("adaptive").steps[:4] == (0, 4, 6, 9)  # official 1, 5, 7, 10
    assert build_refresh(1).refresh_steps(3) == [0, 1, 2]


@pytest.mark.parametrize("options, message", [
    ({"threshold": -2}, "threshold"), ({"refresh": "config9"}, "unknown refresh preset"), ({"refresh": 0}, ">= 1"),
    ({"refresh": [-1]}, "0-based"), ({"buckets": (0.5, 1.2)}, "buckets"), ({"fixed_ratio": 0.5}, "exact=False"),
    ({"threshold_rule": "mean"}, "threshold_rule"), ({"bucket_scope": "model"}, "bucket_scope"),
    ({"exact": False, "fixed_ratio": 0.9}, "fixed_ratio"), ({"max_variants": 1}, "max_variants"),
    ({"treshold": 0.7}, "unknown option"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options({"method": "catome", **options})


def test_defaults_follow_the_official_code():
    cfg = parse_options({"method": "catome"})
    assert isinstance(cfg, CaToMeConfig) and cfg.threshold == 0.7 and cfg.ratio == 0.75 and cfg.exact
    assert cfg.threshold_rule == "batch-max" and cfg.max_downsample == 1 and cfg.scope == ("self",)
    assert cfg.buckets[0] == 0.0 and build_refresh(cfg.refresh).steps == build_refresh("config3").steps


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("threshold", [0.7, 0.4])
def test_every_step_equals_the_official_package(tiny64, threshold):
    """Official refresh steps [0, 1, 4, 8] (1-based) = our calls [0, 3, 7]; fp64, tolerance 1e-10 relative."""
    model, sample, ctx = tiny64
    expected = run_official(official(model, threshold, [0, 1, 4, 8]), sample, ctx)
    fast, made = compile_catome(model, threshold=threshold, refresh=[3, 7], use_rand=False)
    got = run_ours(fast, sample, ctx)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-10
    rt = made[0]
    assert rt.kinds == ["refresh", "cached", "cached", "refresh", "cached", "cached", "cached", "refresh",
                        "cached", "cached"]
    if threshold == 0.4:  # enough merges for non-zero buckets: the masked optional slots and bucketed K both ran
        assert any(k == "cached" and any(b) for k, b in rt.variants)
    assert not all(torch.equal(a, b) for a, b in zip(got, run_ours(model, sample, ctx)))


def test_a_failed_speculation_is_rerun_and_stays_exact(tiny64):
    model, sample, ctx = tiny64
    expected = run_official(official(model, 0.7, [0, 1, 4]), sample, ctx, TIMESTEPS[:5])
    fast, made = compile_catome(model, threshold=0.7, refresh=[3], use_rand=False, bucket_scope="site")
    got = []
    x = sample
    for i, t in enumerate(TIMESTEPS[:5]):
        if i == 3:  # pretend the window allowed the largest bucket: the refresh at call 3 must notice r < bucket
            rt = made[0]
            rt.window = tuple(max(b for b in [int(g.N * 0.75)]) for _, g in rt.sites)
        with torch.no_grad():
            got.append(fast(x, torch.tensor(t), ctx).sample)
        x = x - 0.1 * got[-1]
    assert made[0].stats["reruns"] == 1
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-10


def test_max_variants_reuses_an_exact_variant(tiny64):
    model, sample, ctx = tiny64
    expected = run_official(official(model, 0.4, [0, 1, 4, 8]), sample, ctx)
    fast, made = compile_catome(model, threshold=0.4, refresh=[3, 7], use_rand=False, max_variants=2)
    got = run_ours(fast, sample, ctx)
    assert len(made[0].variants) == 2
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-10


def test_threshold_one_equals_the_unpruned_unet(tiny64):
    model, sample, ctx = tiny64
    fast, made = compile_catome(model, threshold=1.0)
    for t in TIMESTEPS[:3]:
        with torch.no_grad():
            assert torch.equal(fast(sample, torch.tensor(t), ctx).sample, model(sample, torch.tensor(t), ctx).sample)


def test_threshold_minus_one_equals_tome_at_0_75(tiny64):
    model, sample, ctx = tiny64
    fast, made = compile_catome(model, threshold=-1.0, refresh=1, use_rand=False)
    from graphprune.backend import graphprune_backend

    tome = torch.compile(copy.deepcopy(model), backend=lambda gm, ex: graphprune_backend(
        gm, ex, options={"method": "tome", "ratio": 0.75, "use_rand": False, "compiler": "eager"}))
    for a, b in zip(run_ours(fast, sample, ctx), run_ours(tome, sample, ctx)):
        assert rel_err(a, b) < 1e-12
    assert made[0].window == tuple(int(g.N * 0.75) for _, g in made[0].sites)  # all sources merge: top bucket


def test_per_row_rule_merges_exactly_the_pairs_above_threshold():
    """Method level, against a reference written here: each row merges its own sources with best-match >= T."""
    impl = registered_methods()["catome"]
    cfg = parse_options({"method": "catome", "threshold": 0.8, "threshold_rule": "per-row", "use_rand": False})
    H = W = 6
    g = torch.Generator().manual_seed(3)
    shared = torch.tensor([2.0, 0.8])[:, None, None] * torch.randn(2, 1, 8, generator=g)
    metric = shared + torch.randn(2, H * W, 8, generator=g)  # row 0 merges more than row 1
    x = torch.randn(2, H * W, 5, generator=g)
    geo = SiteGeometry(B=2, N=H * W, C=8, H=H, W=W)
    plan = impl.plan(cfg, geo, metric)
    out = impl.restore(cfg, plan, impl.reduce(cfg, plan, x))  # attention = identity: merge then unmerge
    # reference: destinations = top-left of each 2x2 cell
    dst = [y * W + xx for y in range(0, H, 2) for xx in range(0, W, 2)]
    src = [i for i in range(H * W) if i not in dst]
    m = metric / metric.norm(dim=-1, keepdim=True)
    counts = []
    for b in range(2):
        sim = m[b, src] @ m[b, dst].T
        best, arg = sim.max(dim=1)
        merged = {src[i]: dst[int(arg[i])] for i in range(len(src)) if best[i] >= 0.8}
        counts.append(len(merged))
        assert 0 < len(merged) < len(src)
        for d in dst:
            group = [d] + [s for s, t in merged.items() if t == d]
            mean = x[b, group].mean(0)
            torch.testing.assert_close(out[b, d], mean)
            for s in group[1:]:
                torch.testing.assert_close(out[b, s], mean)
        for s in src:
            if s not in merged:
                torch.testing.assert_close(out[b, s], x[b, s])
    assert counts[0] > counts[1]  # the rows differ: "batch-max" would merge counts[0] pairs in row 1 too


# ----------------------------------------------------------------------------------------------- the cache
def test_merge_indices_do_not_change_between_refreshes(tiny64):
    model, sample, ctx = tiny64
    fast, made = compile_catome(model, threshold=0.4, refresh=[4])
    held = []
    x = sample
    for t in TIMESTEPS[:7]:
        with torch.no_grad():
            x = x - 0.1 * fast(x, torch.tensor(t), ctx).sample
        held.append([s.clone() for s in made[0].state])
    # per site: offsets, rank order, best destination, merge decisions, counts
    for k in (1, 2, 3):
        assert all(torch.equal(held[0][i], held[k][i]) for i in range(len(held[0])))
    assert not all(torch.equal(held[3][i], held[4][i]) for i in range(len(held[0])))  # call 4 refreshed
    assert all(torch.equal(held[4][i], held[6][i]) for i in range(len(held[0])))
    assert made[0].kinds == ["refresh", "cached", "cached", "cached", "refresh", "cached", "cached"]
    offsets = held[0][0]
    assert offsets.shape[0] == 1 and int(offsets.max()) < 4 and int(offsets.max()) > 0  # random destinations


def test_cached_variant_attends_over_k_tokens_with_hidden_optional_keys(tiny64):
    model, sample, ctx = tiny64
    fast, made = compile_catome(model, threshold=0.4, refresh=[5], use_rand=False)
    run_ours(fast, sample, ctx, TIMESTEPS[:3])
    rt = made[0]
    (key, variant), = [(k, v) for k, v in rt.variants.items() if k[0] == "cached"]
    plans = [n for n in variant.gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_catome_plan"]
    assert len(plans) == len(rt.sites) == 3 and all(p.args[0].op == "placeholder" for p in plans)  # from state
    attends = [n for n in variant.gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_attention"]
    biases = [n for n in variant.gm.graph.nodes if getattr(n.target, "__name__", "") == "graphprune_catome_key_bias"]
    assert len(attends) == len(biases) == 3
    for a, (_, g), b in zip(attends, rt.sites, key[1]):
        assert tuple(node_val(a.args[0]).shape)[1] == g.N - b and b > 0


def test_two_generations_identical_no_recompiles_and_reset(tiny64):
    model, sample, ctx = tiny64
    calls = []
    from graphprune.backend import graphprune_backend

    def backend(gm, ex):
        calls.append(1)
        return graphprune_backend(gm, ex, options={"method": "catome", "threshold": 0.4, "refresh": "config3",
                                                   "compiler": "eager"})

    fast = torch.compile(model, backend=backend)
    timesteps = [int(t) for t in torch.linspace(999, 1, 50).long()]
    torch._dynamo.utils.counters.clear()
    first = run_ours(fast, sample, ctx, timesteps)
    (rt,) = runtimes(fast)
    variants = dict(rt.variants)
    second = run_ours(fast, sample, ctx, timesteps)
    assert len(calls) == 1 and sum(torch._dynamo.utils.counters["recompiles"].values()) == 0
    assert rt.variants == variants and rt.generation == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert rt.kinds.count("refresh") == 13 and rt.describe()["mean_merged_fraction"] > 0
    import graphprune

    assert graphprune.reset(fast) == 1 and rt.step == 0 and rt.state is None
    assert "catome" in str(graphprune.inspect(fast))


def test_exact_false_is_one_graph_with_a_fixed_count(tiny64):
    model, sample, ctx = tiny64
    fast, made = compile_catome(model, threshold=0.4, refresh=[3], exact=False, use_rand=False)
    ours = run_ours(fast, sample, ctx, TIMESTEPS[:6])
    rt = made[0]
    assert list(rt.variants) == [("fixed", ())]
    counts = rt.variants[("fixed", ())].buckets  # calibrated from T on the first call
    assert all(c > 0 for c in counts)
    # the first call merges exactly the official first step's r at every site: equal to the official at step 1
    expected = run_official(official(model, 0.4, [0, 1, 4]), sample, ctx, TIMESTEPS[:1])
    assert rel_err(ours[0], expected[0]) < 1e-10
    fixed, made_fixed = compile_catome(copy.deepcopy(model), exact=False, fixed_ratio=0.5, refresh=2)
    run_ours(fixed, sample, ctx, TIMESTEPS[:2])
    site_n = [geo.N for _, geo in made_fixed[0].sites]
    assert made_fixed[0].variants[("fixed", ())].buckets == tuple(n // 2 for n in site_n)


def test_apply_on_a_pipeline_resets_per_image():
    import graphprune
    from test_steps import tiny_pipeline

    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=6, height=16,
                    width=16, generator=torch.Generator().manual_seed(1), output_type="latent").images

    baseline = generate()
    graphprune.apply(pipe, method="catome", threshold=0.4, refresh=2, compiler="eager")
    first, second = generate(), generate()
    assert torch.equal(first, second) and 1e-6 < rel_err(first, baseline) < 0.5
    (rt,) = graphprune.runtimes(pipe)
    assert rt.kinds == ["refresh", "cached"] * 3
    graphprune.remove(pipe)
    assert torch.equal(generate(), baseline)


def test_inductor_runs_the_exact_variants():
    """The refresh and cached graphs (bool/int state inputs, the -inf key bias) through Inductor equal the eager
    rewritten graphs."""
    model = models.unet(models.SD15_TINY)
    (sample, _, ctx), _ = models.unet_inputs(model, 16)
    eager, made_eager = compile_catome(model, threshold=0.4, refresh=[5], seed=3)
    expected = run_ours(eager, sample, ctx, TIMESTEPS[:2])
    torch._dynamo.reset()
    fast, made = compile_catome(model, threshold=0.4, refresh=[5], seed=3, compiler="inductor")
    got = run_ours(fast, sample, ctx, TIMESTEPS[:2])
    assert [k for k in made[0].variants] == [k for k in made_eager[0].variants]
    assert any(any(b) for _, b in made[0].variants)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
