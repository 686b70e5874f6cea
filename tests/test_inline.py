"""The rewritten graph handed to Inductor holds only cacheable ops (graphprune.passes.inline): the same outputs as the
rewritten graph, AOTAutograd's cache check passes (it bypassed graphs with graphprune's closures), and a second
compile of the same config loads from the on-disk caches while another config does not collide with it."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable

from graphprune.backend import graphprune_backend
from graphprune.methods import parse_options
from graphprune.methods.tome import ToMe
from graphprune.passes.cut import copy_graph_module
from graphprune.passes.inline import _Unstable, fingerprint, inline_calls, is_graphprune_call
from graphprune.passes.splice import token_calls

from models import SD15_TINY, HandAttentionBlock, StyleUNet, unet, unet_inputs

CONFIGS = [
    {"method": "tome", "ratio": 0.5},
    {"method": "sito", "ratio": 0.6, "scope": "self+cross+ff"},
    {"method": "tome", "ratio": 0.4, "scope": "block", "max_downsample": 2},
    {"method": "todo", "factor": 2, "factor_level_2": 2, "max_downsample": 2},
    {"method": "random", "ratio": 0.5},
]


def _rewritten(model, args, kwargs, options):
    """(rewritten graph, its full example inputs incl. fresh random draws) of the model's single Dynamo graph."""
    got = {}

    def backend(gm, example_inputs):
        fn = graphprune_backend(gm, example_inputs, options={**options, "compiler": "eager"})
        got["gm"], got["inputs"] = fn.gm, list(example_inputs) + (fn.feed.draw() if fn.feed else [])
        return fn

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return got["gm"], got["inputs"]


#: model code whose rewrite inserts more than linears: fused qkv 1x1 conv1d with per-head index columns (ADM legacy),
#: 1x1 conv2d (k-diffusion), separate 1x1 convs (VAE); flattening / channels-first closures
STYLES = {"adm-legacy": dict(conv="adm-legacy"), "kdiff": dict(conv="kdiff"), "vae": dict(conv="vae"),
          "ldm-einsum": dict(attention="einsum", layout="einops", use_linear=False)}


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ":".join(f"{k}={v}" for k, v in o.items()))
def test_inlined_graph_computes_the_same_with_cacheable_ops_only(options):
    model = unet(SD15_TINY)
    args, kwargs = unet_inputs(model, latent=16)
    _check_inlined(*_rewritten(model, args, kwargs, options))


@pytest.mark.parametrize("style", STYLES)
def test_model_styles_inline_too(style):
    torch.manual_seed(0)
    model = StyleUNet(**STYLES[style]).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 5, 16, generator=g))
    _check_inlined(*_rewritten(model, args, {}, {"method": "tome", "ratio": 0.5}))


def _check_inlined(gm, inputs):
    calls = [n for n in gm.graph.nodes if is_graphprune_call(n)]
    assert calls, "the rewrite inserted graphprune's functions"
    with pytest.raises(BypassAOTAutogradCache):
        check_cacheable(gm)  # what made every warm compile re-trace the UNet
    inlined = copy_graph_module(gm)
    assert inline_calls(inlined) == len(calls)
    assert not [n for n in inlined.graph.nodes if is_graphprune_call(n)]
    check_cacheable(inlined)  # raises if any node still bypasses AOTAutograd's cache
    assert [n for n in gm.graph.nodes if is_graphprune_call(n)] == calls  # the copy was edited, not the original
    with torch.no_grad():
        ref, out = gm(*inputs), inlined(*inputs)
    for r, o in zip(ref, out):
        assert torch.equal(r, o)


def test_fingerprints_name_the_behaviour():
    m = ToMe()
    a, b, c = (token_calls(m, parse_options({"method": "tome", "ratio": r}))[0] for r in (0.5, 0.5, 0.3))
    assert a is not b and fingerprint(a) == fingerprint(b) != fingerprint(c)
    cols = slice(0, 4)  # projection columns (a slice or index tuple) are plain data: memoizable
    assert fingerprint(lambda t: t[..., cols]) == fingerprint(lambda t: t[..., cols])
    node = torch.fx.Graph().placeholder("x")
    with pytest.raises(_Unstable):
        fingerprint(lambda x: node)  # a graph node has no canonical description: that call is traced, not memoized


@pytest.mark.slow
def test_a_second_compile_loads_from_the_caches_and_another_config_does_not_collide(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    block = HandAttentionBlock(dim=32, heads=4).eval()
    img = torch.randn(2, 4, 8, 8)

    def compiled(ratio):
        torch._dynamo.reset()
        before = dict(counters["aot_autograd"])
        with torch.no_grad():
            out = torch.compile(block, backend="graphprune", options={"method": "tome", "ratio": ratio,
                                                                      "use_rand": False})(img)
        grew = {k: v - before.get(k, 0) for k, v in counters["aot_autograd"].items() if v != before.get(k, 0)}
        return out, grew

    first, cold = compiled(0.5)
    second, warm = compiled(0.5)
    other, third = compiled(0.25)
    torch._dynamo.reset()
    assert cold.get("autograd_cache_miss") == 1 and cold.get("autograd_cache_saved") == 1 and "autograd_cache_bypass" not in cold
    assert warm.get("autograd_cache_hit") == 1 and torch.equal(first, second)
    assert third.get("autograd_cache_miss") == 1 and not torch.equal(first, other)


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs()


_difference.__module__ = "graphprune.tests"  # an inserted function, as the rewrite's are


def test_inputs_sharing_one_meta_value_stay_two_inputs():
    """Regression (issue 17): DaTo's step graph held ``eps_prev`` and ``eps_prev2`` with one shared meta value; make_fx
    maps tensors to inputs by identity, so the inlined plan computed ``eps_prev2 - eps_prev2`` (zero dynamics) and
    inlined DaTo gave wrong results under Inductor with policy="first-block" or forecast="taylor"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    shared = FakeTensorMode().from_tensor(torch.zeros(2, 3))
    a.meta["val"] = b.meta["val"] = shared
    graph.output(graph.call_function(_difference, (a, b)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert inline_calls(gm) == 1 and not any(is_graphprune_call(n) for n in gm.graph.nodes)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(gm(x, y), (x - y).abs())
