"""One suite over every registered method: a new method cannot skip it, and the suite needs no edit for it.

The suite asks each method what to expect instead of knowing it: the budget K (:meth:`TokenMethod.budget`), the
rewrite form (``form``: "tokens" reduce -> attend -> restore; "kv" keys/values only), whether it removes tokens at
all (``prunes_tokens``), which runtime a config needs (:meth:`TokenMethod.runtime`) and the options under which every
call runs the same pruned graph (:meth:`TokenMethod.every_step_options`). The independent formulas for each
method's K are tested in the method's own test file.
"""

import pytest
import torch

import models
from graphprune.config import config_fields
from graphprune.methods import SiteGeometry, SiteSkip, parse_options, registered_methods
from helpers import compile_with, rel_err

METHODS = sorted(registered_methods())
TOKEN_METHODS = [m for m in METHODS if registered_methods()[m].prunes_tokens]


def impl(method: str):
    return registered_methods()[method]


def every_step(method: str, ratio: float, **options) -> dict:
    """Options of a whole-model test: the method's every-step form at ``ratio``, the finest level only."""
    return {"method": method, **impl(method).every_step_options(ratio), "max_downsample": 1, **options}


def seeded(method: str, seed: int) -> dict:
    """``{"seed": seed}`` for methods that draw random inputs (others have no seed option)."""
    return {"seed": seed} if "seed" in config_fields(type(parse_options({"method": method}))) else {}


def test_registry_is_collected():
    assert {"tome", "sito", "todo", "random", "deepcache", "dato", "catome", "atedm"} <= set(METHODS)
    assert len(TOKEN_METHODS) == len(METHODS) - 1  # deepcache caches features, it prunes no token


@pytest.fixture(scope="module")
def tiny():
    model = models.unet(models.SD15_TINY)
    return model, models.unet_inputs(model, 16)[0]


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_ratio_zero(method, tiny):
    model, args = tiny
    fast, cap = compile_with(model, **every_step(method, 0.0))
    assert torch.equal(fast(*args).sample, model(*args).sample)
    assert cap.reports and all(r.count("pruned") == 0 for r in cap.reports)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("H,W", [(12, 10), (7, 9)])
def test_static_budget_and_shapes(method, ratio, H, W):
    m = impl(method)
    if not m.prunes_tokens:
        with pytest.raises(ValueError, match="ratio"):  # a method that prunes nothing refuses a ratio
            parse_options({"method": method, "ratio": ratio})
        cfg = parse_options({"method": method})
        with pytest.raises(SiteSkip):
            m.budget(cfg, SiteGeometry(B=2, N=H * W, C=8, H=H, W=W))
        return
    options = {"method": method, **m.every_step_options(ratio)}
    try:
        cfg = parse_options(options)
    except ValueError as exc:  # a ratio above the method's cap for its cells: the message names the fix
        assert "ratio" in str(exc)
        return
    geo = SiteGeometry(B=2, N=H * W, C=8, H=H, W=W, bucket=int(H * W * ratio) if m.stateful else 0)
    try:
        K = m.budget(cfg, geo)
    except SiteSkip as exc:  # e.g. more pruned tokens than non-base ones on this grid
        assert str(exc)
        return
    assert isinstance(K, int) and 1 <= K < geo.N
    metric = torch.randn(2, geo.N, 8)
    state = [torch.randn(2, 4, H, W) for _ in m.context_inputs]  # cross-step state, e.g. DaTo's eps history
    rand = [torch.randn(s.shape) if s.kind == "normal" else torch.randint(s.high, s.shape)
            for s in m.random_inputs(cfg, geo)]
    # AT-EDM plans from the ranking attention's q and k (B, N, h*d) instead of a metric: here one head each
    sources = [metric, torch.randn(2, geo.N, 8)] if m.plan_source == "attention" else [metric]
    plan = m.plan(cfg, geo, *sources, *state, *rand)
    again = m.plan(cfg, geo, *sources, *state, *rand)
    assert all(torch.equal(a, b) for a, b in zip(plan, again))  # deterministic given its inputs
    x = torch.randn(2, geo.N, 5)
    reduced = m.reduce(cfg, plan, x)
    assert reduced.shape == (2, K, 5)
    if m.form == "kv":  # keys/values only: the attention output already has N tokens
        return
    restored = m.restore(cfg, plan, reduced)
    assert restored.shape == x.shape and torch.isfinite(restored).all()


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_pruned_model_is_close_but_different_and_compiles_once(method, tiny):
    model, (sample, t, ctx) = tiny
    fast, cap = compile_with(model, **every_step(method, 0.5))
    ref = model(sample, t, ctx).sample
    for step in torch.linspace(999, 0, 10).long():
        out = fast(sample, step, ctx).sample
    out = fast(sample, t, ctx).sample
    assert len(cap.reports) == 1, "one graph, compiled once over 11 timesteps"
    report = cap.report
    # the three 16x16 transformer stacks of the tiny UNet: their self-attentions, or the stacks (region form)
    kind = "block" if report.count("pruned", "block") else "self"
    assert report.count("pruned", kind) == 3
    cfg = parse_options({"method": method, **report.config["_data"]})
    geo = SiteGeometry(B=2, N=256, C=32, H=16, W=16)
    if impl(method).stateful:  # a carried plan's compiled variant fixes its count (its bucket)
        geo = SiteGeometry(B=2, N=256, C=32, H=16, W=16, bucket=impl(method).fixed_bucket(cfg, geo))
    assert {s.K for s in report.pruned if s.kind == kind} == {impl(method).budget(cfg, geo)}
    # a region also drops the pruned tokens' cross-attention and feed-forward updates (random weights: larger error)
    bound = 1.0 if kind == "block" else 0.5
    assert torch.isfinite(out).all() and 1e-4 < rel_err(out, ref) < bound


@pytest.mark.parametrize("method", [m for m in METHODS if impl(m).runtime(parse_options({"method": m})) != "none"])
def test_runtime_generations_are_reproducible_and_compile_once(method, tiny):
    """Methods whose default config needs a runtime across steps (caching, carried matches, phases): two
    generations of 12 steps give identical outputs, Dynamo traces once, and some step differs from the UNet."""
    model, (sample, _, ctx) = tiny
    torch._dynamo.utils.counters.clear()
    fast, cap = compile_with(model, method=method, **seeded(method, 3))
    steps = torch.linspace(999, 0, 12).long()
    runs = [[fast(sample, t, ctx).sample for t in steps] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref = [model(sample, t, ctx).sample for t in steps]
    assert max(rel_err(o, r) for o, r in zip(runs[0], ref)) > 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("method", METHODS)
def test_inductor_compiles_the_rewrite(method, tiny):
    model, args = tiny
    opts = every_step(method, 0.5 if impl(method).prunes_tokens else 0.0, **seeded(method, 7))
    eager, _ = compile_with(model, **opts)
    expected = eager(*args).sample
    torch._dynamo.reset()
    fast = torch.compile(model, backend="graphprune", options=opts)
    torch.testing.assert_close(fast(*args).sample, expected, rtol=1e-4, atol=1e-4)


def test_mode_is_forwarded_to_inductor(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    block = models.HandAttentionBlock().eval()

    def patches(**options):
        torch._dynamo.reset()
        fast = torch.compile(block, backend="graphprune", options={"method": "tome", "ratio": 0.5, "use_rand": False,
                                                                   **options})
        fast(torch.randn(2, 4, 8, 8))
        return seen["patches"]

    # on the CPU graphprune turns Inductor's per-call weight layout copies off; mode and inductor_config come on top
    assert patches() == {"layout_optimization": False}
    assert patches(mode="max-autotune") == {"layout_optimization": False,
                                             **torch._inductor.list_mode_options("max-autotune")}
    assert patches(inductor_config={"layout_optimization": True, "max_autotune": False}) == {
        "layout_optimization": True, "max_autotune": False}
    torch._dynamo.reset()


def test_inductor_settings_off_the_cpu_and_bad_ones():
    from graphprune.inner import inductor_patches
    from graphprune.methods import parse_options

    config = parse_options({"method": "tome"})
    assert inductor_patches(config, [torch.zeros(2, device="meta")]) is None  # only CPU graphs get graphprune's
    assert inductor_patches(config, [torch.zeros(2), 3]) == {"layout_optimization": False}
    for bad, words in (({"inductor_config": {"layout_optimisation": False}}, ["unknown", "layout_optimisation"]),
                       ({"inductor_config": ["layout_optimization"]}, ["must be a dict"]),
                       ({"inductor_config": {"layout_optimization": True}, "compiler": "eager"},
                        ["needs compiler='inductor'"])):
        with pytest.raises(ValueError) as info:
            parse_options({"method": "tome", **bad})
        assert all(w in str(info.value) for w in words)


def test_aot_eager_compiler(tiny):
    model, args = tiny
    eager, _ = compile_with(model, method="sito", ratio=0.5, seed=1)
    expected = eager(*args).sample
    torch._dynamo.reset()
    fast, _ = compile_with(model, method="sito", ratio=0.5, seed=1, compiler="aot_eager")
    torch.testing.assert_close(fast(*args).sample, expected)


def _runs_on_a_bare_attention(method: str) -> str | None:
    """Why a method cannot prune the hand-written attention block (no timestep, no transformer stack), or None."""
    m = impl(method)
    if not m.prunes_tokens:
        return "prunes no token"
    cfg = parse_options(every_step(method, 0.5))
    if m.runtime(cfg) != "none" or m.context_inputs:
        return "needs a UNet: its state comes from earlier denoising steps (timestep input, noise predictions)"
    if cfg.scope == ("block",):
        return "prunes a span of a transformer stack; the bare attention module has no stack"
    return None


@pytest.mark.parametrize("method", METHODS)
def test_inductor_on_an_odd_grid(method):
    """7 x 9 tokens: leftover rows/columns that fill no 2 x 2 cell (constant index tables inside the graph)."""
    why = _runs_on_a_bare_attention(method)
    block = models.HandAttentionBlock().eval()
    img = torch.randn(2, 4, 7, 9)
    opts = every_step(method, 0.5 if impl(method).prunes_tokens else 0.0, **seeded(method, 2))
    if why is not None:  # the method must then leave the block unchanged or refuse it clearly, never break it
        fast, cap = compile_with(block, **opts)
        if impl(method).runtime(parse_options(opts)) != "none":
            with pytest.raises(Exception, match="timestep"):
                fast(img)
        else:
            torch.testing.assert_close(fast(img), block(img), rtol=0, atol=0)
            assert cap.report.count("pruned") == 0 and all(s.reason for s in cap.report.sites)
        pytest.skip(f"{method}: {why} (odd grids: test_static_budget_and_shapes)")
    eager, cap = compile_with(block, **opts)
    expected = eager(img)
    cfg = parse_options(opts)
    geo = SiteGeometry(B=2, N=63, C=32, H=7, W=9)
    assert cap.report.sites[0].grid == (7, 9) and cap.report.sites[0].K == impl(method).budget(cfg, geo)
    torch._dynamo.reset()
    fast = torch.compile(block, backend="graphprune", options=opts)
    torch.testing.assert_close(fast(img), expected, rtol=1e-5, atol=1e-5)
