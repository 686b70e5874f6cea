"""Real use: pruning survives changes of batch and resolution, generations are reproducible, inspect tells the truth.

A compiled model called at several shapes runs, at every call, a graph pruned for that call's shapes (K as a fresh
``dynamic=False`` compile at those shapes gives, and the same output), whatever Dynamo hands the backend: the static
graph of the first shape, the symbolic graph of automatic dynamic shapes after a change, or ``dynamic=True``.
"""

from __future__ import annotations

import pytest
import torch

import graphprune
import models
from graphprune.methods import registered_methods
from helpers import compile_with

#: (latent H, latent W, batch) in the order the issue lists them
SHAPES = [(16, 16, 2), (12, 12, 2), (16, 16, 2), (8, 20, 2), (16, 16, 4), (16, 16, 3)]
#: deterministic configs (no random inputs), so a fresh compile at each shape is an exact reference
DETERMINISTIC = {"tome": {"use_rand": False}, "sito": {"noise_alpha": 0.0}, "todo": {}}


@pytest.fixture(scope="module")
def tiny():
    return models.unet(models.SD15_TINY)


def inputs(model, H, W, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, H, W, generator=g), torch.tensor(500), torch.randn(B, 7, 32, generator=g))


def ks(report) -> list[tuple[str, int]]:
    return sorted((s.module_path, s.K) for s in report.pruned)


def fresh(model, args, options):
    """A fresh ``dynamic=False`` compile at these shapes: its output and its pruned sites."""
    torch._dynamo.reset()
    reports = []

    def backend(gm, ex):
        from graphprune.backend import graphprune_backend

        return graphprune_backend(gm, ex, options=options, reports=reports)

    out = torch.compile(model, backend=backend, dynamic=False)(*args).sample
    assert len(reports) == 1
    return out, ks(reports[0])


# each method once and each Dynamo shape policy twice (the three methods share the path; ~50 s per case on CI)
@pytest.mark.parametrize("dynamic, method", [(None, "tome"), (True, "sito"), (None, "todo"), (True, "tome")])
def test_every_call_pruned_for_its_shape(tiny, method, dynamic):
    options = {"method": method, "compiler": "eager", **DETERMINISTIC[method]}
    expected = {}
    for H, W, B in dict.fromkeys(SHAPES):
        expected[(H, W, B)] = fresh(tiny, inputs(tiny, H, W, B), options)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reports = []

    def backend(gm, ex):
        from graphprune.backend import graphprune_backend

        return graphprune_backend(gm, ex, options=options, reports=reports)

    fast = torch.compile(tiny, backend=backend, dynamic=dynamic)
    for H, W, B in SHAPES:
        out = fast(*inputs(tiny, H, W, B)).sample
        ref_out, ref_k = expected[(H, W, B)]
        assert ref_k, "the fresh compile prunes"
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        label = f"{B}x4x{H}x{W}"
        mine = [r for r in reports if r.shape.startswith(label)]
        assert mine and ks(mine[-1]) == ref_k, (label, [r.shape for r in reports])
    # Dynamo's own graphs: a static one for the first shape (unless dynamic=True), a symbolic one after the first
    # change, and one more when H != W breaks its "duck" shape H == W; then no more, whatever the shape
    traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert traced <= (2 if dynamic else 3)
    assert len(reports) == len(dict.fromkeys(SHAPES))  # each shape compiled once (the repeated 16x16 reused)
    more = [(10, 14, 2), (20, 8, 3), (12, 16, 1)]  # batch 1: Dynamo specializes sizes 0 and 1 (one more graph)
    for H, W, B in more:
        fast(*inputs(tiny, H, W, B))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= traced + 1
    traced, compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"], len(reports)
    assert compiled == len(dict.fromkeys(SHAPES + more))
    for H, W, B in SHAPES + more:  # every shape again, through Dynamo's newest graphs: nothing traced or compiled
        fast(*inputs(tiny, H, W, B))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == traced and len(reports) == compiled
    assert all(r.pruned for r in reports)


def test_max_shapes_is_an_lru_with_a_warning(tiny):
    options = {"method": "tome", "compiler": "eager", "use_rand": False, "max_shapes": 2}
    fast, cap = compile_with(tiny, **options)
    fast(*inputs(tiny, 16, 16, 2))
    fast(*inputs(tiny, 12, 12, 2))  # symbolic graph from here: 12x12
    fast(*inputs(tiny, 8, 8, 2))  # 8x8
    with pytest.warns(UserWarning, match="max_shapes=2"):
        fast(*inputs(tiny, 8, 12, 2))  # a third shape in the symbolic graph drops 12x12
    specialized = [r for r in cap.reports if r.shape.startswith("2x4x")]
    assert len(specialized) == 4 and all(r.pruned for r in specialized)


@pytest.mark.parametrize("method", ["deepcache", "dato", "catome"])
def test_runtimes_are_per_shape_and_a_shape_change_starts_a_generation(tiny, method):
    options = {"method": method, "compiler": "eager", **({"cache_interval": 2} if method != "catome" else
                                                          {"threshold": 0.4, "refresh": 2})}
    fast, cap = compile_with(tiny, **options)
    steps = torch.linspace(999, 100, 4).long()
    for t in steps[:3]:
        fast(*inputs(tiny, 16, 16, 2)[:1], t, inputs(tiny, 16, 16, 2)[2])
    a, = [r for r in graphprune.runtimes(tiny) if r.shape.startswith("2x4x16x16")]
    assert a.kinds == (["full", "shallow", "full"] if method != "catome" else ["refresh", "cached", "refresh"])
    for t in steps[:2]:  # another resolution: its own runtime, from step 0
        fast(*inputs(tiny, 12, 12, 2)[:1], t, inputs(tiny, 12, 12, 2)[2])
    b, = [r for r in graphprune.runtimes(tiny) if r.shape.startswith("2x4x12x12")]
    assert b.step == 2 and b.generation == 0
    assert all(r.pruned for _, r in b.graph_reports) or method == "deepcache"
    fast(*inputs(tiny, 16, 16, 2)[:1], steps[3], inputs(tiny, 16, 16, 2)[2])  # back: a new generation at step 0
    assert a.generation == 1 and a.kinds == ["full" if method != "catome" else "refresh"]


def test_reset_restarts_every_methods_random_draws(tiny):
    for method in ("tome", "sito", "random"):
        fast, _ = compile_with(tiny, method=method, seed=3)
        args = inputs(tiny, 16, 16, 2)
        first, second = fast(*args).sample, fast(*args).sample
        assert not torch.equal(first, second), f"{method}: draws differ from call to call"
        assert graphprune.reset(fast) >= 1
        assert torch.equal(fast(*args).sample, first), f"{method}: reset restarts the draws"
        torch._dynamo.reset()


def tiny_pipeline(unet):
    from graphprune.archs import build_pipeline

    return build_pipeline("tiny", unet=unet)


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_pipelines_are_reproducible_for_every_method(method):
    pipe = tiny_pipeline(models.unet(models.SD15_TINY))
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def generate(size=64):
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4, height=size,
                    width=size, generator=torch.Generator().manual_seed(1), output_type="latent").images

    graphprune.apply(pipe, method=method, compiler="eager")
    first, second = generate(), generate()
    assert torch.equal(first, second)
    report = graphprune.inspect(pipe)
    assert report.graphs and (report.count("pruned") > 0 or not registered_methods()[method].prunes_tokens)


def test_apply_keeps_pruning_across_two_resolutions():
    pipe = tiny_pipeline(models.unet(models.SD15_TINY))
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    graphprune.apply(pipe, method="tome", use_rand=False, compiler="eager")
    for size in (64, 96, 64):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, height=size, width=size,
             output_type="latent")
    report = graphprune.inspect(pipe)
    shapes = {g.shape.split(",")[0] for g in report.graphs}
    assert shapes == {"2x4x8x8", "2x4x12x12"} and all(g.pruned for g in report.graphs)
    assert "shape" in str(report)  # the table has a shape column when there are several


# ---------------------------------------------------------------------------------------------------- inspect

def test_inspect_is_not_fooled_by_an_earlier_compile_at_another_shape(tiny):
    fast, _ = compile_with(tiny, method="sito", ratio=0.5)
    fast(*inputs(tiny, 16, 16, 2))
    fast(*inputs(tiny, 12, 12, 2))  # the user's model has now gone symbolic
    report = graphprune.inspect(tiny, *inputs(tiny, 8, 8, 2), options={"method": "sito", "ratio": 0.5})
    assert report.count("pruned", "self") == 3 and {s.K for s in report.pruned} == {32}
    assert report.count("unmatched") == 0
    # and the user's compiled model still runs and prunes at a further shape
    fast(*inputs(tiny, 8, 12, 2))
    assert any(g.shape.startswith("2x4x8x12") and g.pruned for g in graphprune.inspect(tiny).graphs)


def test_inspect_of_a_compiled_model_lists_shapes_and_variants(tiny):
    fast, _ = compile_with(tiny, method="atedm", dsap_steps=1, max_downsample=1)
    for t in (999, 500):
        fast(inputs(tiny, 16, 16, 2)[0], torch.tensor(t), inputs(tiny, 16, 16, 2)[2])
    report = graphprune.inspect(fast)
    assert [g.variant for g in report.graphs] == ["early", "late"]
    assert "variant" in str(report).splitlines()[1]
    assert report.runtimes and report.runtimes[0]["step"] == 2


def test_inspect_without_options_uses_the_compiled_config(tiny):
    fast, _ = compile_with(tiny, method="todo", factor=2)
    fast(*inputs(tiny, 16, 16, 2))
    report = graphprune.inspect(tiny, *inputs(tiny, 16, 16, 2))
    assert report.graphs[0].config["_type"] == "todo" and report.count("pruned", "self") == 3


def test_inspect_runs_on_meta_and_says_unsupported_architecture():
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    report = graphprune.inspect(ConvNet(), torch.randn(2, 4, 8, 8), options={"method": "tome"})
    assert "unsupported architecture" in report.verdict() and "unsupported architecture" in str(report)
    with torch.device("meta"):  # a model with no weights at all: inspect needs none and computes nothing
        weightless = models.unet(models.SD15_TINY)
    meta_report = graphprune.inspect(weightless, *inputs(None, 16, 16, 2), options={"method": "tome"})
    assert meta_report.count("pruned", "self") == 3


# ---------------------------------------------------------------------------------------------------- defaults, errors

def test_one_default_everywhere():
    from graphprune.cli import build_parser
    from graphprune.methods import DEFAULT_OPTIONS, parse_options

    assert parse_options(None).method == parse_options({}).method == DEFAULT_OPTIONS["method"]
    assert parse_options({"ratio": 0.3}).ratio == 0.3
    args = build_parser().parse_args(["inspect", "--arch", "tiny"])
    assert args.method is None  # the CLI leaves the choice to DEFAULT_OPTIONS


@pytest.mark.parametrize("bad, words", [(["tome"], ["options must be a dict"]),
                                        ({"method": "tome", "bogus": 1}, ["unknown option", "bogus"])])
def test_bad_options_raise_at_once(tiny, bad, words):
    for call in (lambda: graphprune.compile(tiny, bad) if isinstance(bad, list) else graphprune.compile(tiny, **bad),
                 lambda: graphprune.apply(tiny_pipeline(tiny), options=bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert all(w in str(info.value) for w in words)
