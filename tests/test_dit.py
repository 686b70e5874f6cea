"""DiT coverage: the built-in archs pixart-tiny (ada_norm_single) and dit-tiny (ada_norm_zero, class labels).

The matcher proves their self-attentions in both IRs, every registered method runs on them through the backend
(one graph, no recompile over timesteps), todo and random match the eager reference processors, and inspect gives a
reason for every site it does not prune.
"""

from __future__ import annotations

import copy

import pytest
import torch

import graphprune
from graphprune.archs import ARCHS, TRANSFORMERS, build_model, example_inputs
from graphprune.methods import parse_options, registered_methods
from graphprune.passes.match import find_attention_sites
from helpers import compile_with, rel_err
from test_todo_random import RefProcessor, install

DITS = sorted(TRANSFORMERS)
GRIDS = {64: (8, 8, 1)}  # latent 16, patch 2
#: step-aware methods (feature caching) cut the U-Net's up path: they do not apply to DiTs and must say so
STEP_AWARE = {m for m in registered_methods() if parse_options({"method": m}).caches}
PRUNING = sorted(set(registered_methods()) - STEP_AWARE)


@pytest.fixture(scope="module", params=DITS)
def dit(request):
    model = build_model(request.param)
    return request.param, model, example_inputs(model, latent=16, batch=2)


def test_archs_are_built_in():
    assert {"pixart-tiny", "dit-tiny"} <= set(ARCHS)
    assert type(build_model("dit-tiny")).__name__ == "DiTTransformer2DModel"


@pytest.mark.parametrize("ir", ["dynamo", "export"])
def test_matcher_proves_the_dit_self_attentions(dit, ir):
    from diffusers.models.attention_processor import Attention

    name, model, (args, kwargs) = dit
    if ir == "dynamo":
        graphs = []
        torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*args, **kwargs)
        graph = graphs[0].graph
    else:
        graph = torch.export.export(model, args, kwargs).graph
    sites, unmatched = find_attention_sites(graph)
    assert not unmatched, [u.reason for u in unmatched]
    expected = {p: "cross" if m.is_cross_attention else "self" for p, m in model.named_modules()
                if isinstance(m, Attention)}
    assert {s.module_path: s.kind for s in sites} == expected
    selfs = [s for s in sites if s.kind == "self"]
    assert len(selfs) == 2 and all(s.grid == (8, 8) and s.metric_source == "pre-norm block input" for s in selfs)


def test_no_graph_breaks(dit):
    name, model, (args, kwargs) = dit
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("method", PRUNING)
def test_every_method_runs_and_compiles_once(dit, method):
    from test_conformance import every_step

    name, model, (args, kwargs) = dit
    fast, cap = compile_with(model, **every_step(method, 0.5))  # catome: fixed count; atedm: no DSAP
    ref = model(*args, **kwargs).sample
    for t in (999, 500, 20):
        out = fast(*args, **{**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)}).sample
    out = fast(*args, **kwargs).sample
    region = parse_options(every_step(method, 0.5)).scope == ("block",)
    if region:  # one stack of 2 layers: layer 1 ranks on all N tokens, layer 2 runs on K
        assert len(cap.reports) == 1 and cap.report.count("pruned", "block") == 1
    else:
        assert len(cap.reports) == 1 and cap.report.count("pruned", "self") == 2
    assert torch.isfinite(out).all() and 1e-4 < rel_err(out, ref) < (1.0 if region else 0.5)


@pytest.mark.parametrize("method, options", [("todo", {"factor": 2}), ("todo", {"downsample_method": "avg_pool"}),
                                             ("random", {"ratio": 0.5})])
def test_matches_the_reference_processor(dit, method, options, monkeypatch):
    from graphprune.inner import RandomFeed

    name, model, (args, kwargs) = dit
    drawn: list = []
    draw = RandomFeed.draw
    monkeypatch.setattr(RandomFeed, "draw", lambda self: drawn.append(draw(self)) or drawn[-1])
    fast, cap = compile_with(model, method=method, **options)
    out = fast(*args, **kwargs).sample
    assert cap.report.count("pruned", "self") == 2
    if method == "todo":
        proc = RefProcessor("todo", GRIDS, {1: {"method": options.get("downsample_method", "nearest-exact"),
                                                "factor": 2}})
    else:
        proc = RefProcessor("random", GRIDS, {1: {}}, list(drawn[0]), options["ratio"])
    ref = install(copy.deepcopy(model), proc)(*args, **kwargs).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", PRUNING)
def test_inspect_gives_a_reason_for_every_site_left_alone(dit, method):
    name, model, (args, kwargs) = dit
    region = parse_options({"method": method}).scope == ("block",)  # AT-EDM: the region form only
    scope = "block" if region else "self" if registered_methods()[method].form == "kv" else "self+cross+ff"
    options = {"method": method, **registered_methods()[method].every_step_options(0.5), "scope": scope,
               "max_downsample": 2}
    report = graphprune.inspect(model, *args, options=options, **kwargs)
    expected = 1 if region else 2  # AT-EDM's ranking layer stays on all N tokens
    assert report.count("pruned", "self") == expected and report.count("unmatched") == 0
    for site in report.sites:
        assert site.status == "pruned" or site.reason, site
        assert site.reason  # pruned sites say what was done (N -> K, metric or none)


@pytest.mark.parametrize("method", sorted(STEP_AWARE))
def test_step_aware_methods_say_why_they_do_not_apply(dit, method):
    name, model, (args, kwargs) = dit
    options = {"method": method, "ratio": 0.0 if method == "deepcache" else 0.5}
    with pytest.raises(Exception, match="DiTs have no U-shaped skip path"):
        graphprune.inspect(model, *args, options=options, **kwargs)
