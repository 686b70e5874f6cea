"""method="todo" and method="random": plan-level numerics and end-to-end runs against eager references written here.

The references do it the way the official code does (ToDo: reshape to (B, C, h, w) and ``F.interpolate`` /
``F.avg_pool2d`` / ``F.max_pool2d`` as ImprovedTokenMerge's ``up_or_downsample``; random: argsort of the noise and a
brute-force nearest search), inside a diffusers attention processor around diffusers' own ``AttnProcessor2_0``.
Nothing here calls graphprune's method code to build an expected value.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

import models
from graphprune.backend import graphprune_backend
from graphprune.inner import RandomFeed
from graphprune.methods import RandomConfig, ToDoConfig, parse_options
from graphprune.methods import SiteGeometry
from graphprune.methods.random import RandomPrune
from graphprune.methods.todo import ToDo, pick
from helpers import compile_with, rel_err

# SD15_TINY at latent 16: level 1 = 16 x 16 (3 self-attentions), level 2 = 8 x 8 (4 self-attentions)
SD15_GRIDS = {256: (16, 16, 1), 64: (8, 8, 2)}


# ----------------------------------------------------------------------------------------------- references

def ref_downsample(x: torch.Tensor, h: int, w: int, method: str, factor: int | None = None,
                   size: tuple[int, int] | None = None) -> torch.Tensor:
    """ImprovedTokenMerge's up_or_downsample: x (B, h*w, C) -> (B, M, C)."""
    B, _, C = x.shape
    item = x.reshape(B, h, w, C).permute(0, 3, 1, 2)
    if method == "avg_pool":
        item = F.avg_pool2d(item, kernel_size=factor, stride=factor)
    elif method == "max_pool":
        item = F.max_pool2d(item, kernel_size=factor, stride=factor)
    else:
        item = F.interpolate(item, size=size or (h // factor, w // factor), mode=method)
    return item.permute(0, 2, 3, 1).reshape(B, -1, C)


def ref_random(noise: torch.Tensor, H: int, W: int, ratio: float):
    """Prune the R = int(N * ratio) tokens with the largest noise; each pruned token copies its nearest kept token
    (squared grid distance, ties to the lowest raster index). Returns (prune, recover)."""
    B, N = noise.shape
    R = int(N * ratio)
    order = noise.argsort(dim=1, descending=True, stable=True)
    pruned, kept = order[:, :R], order[:, R:]
    y, x = torch.arange(N) // W, torch.arange(N) % W
    d2 = (y[pruned][..., None] - y[kept][:, None]) ** 2 + (x[pruned][..., None] - x[kept][:, None]) ** 2
    key = d2 * N + kept[:, None, :]  # lexicographic (distance, raster index)
    src = key.argmin(dim=-1)  # (B, R) position in ``kept``

    def prune(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[b, kept[b]] for b in range(B)])

    def recover(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, N, t.shape[-1], dtype=t.dtype)
        for b in range(B):
            out[b, kept[b]] = t[b]
            out[b, pruned[b]] = t[b, src[b]]
        return out

    return prune, recover


class RefProcessor:
    """attn1 processor: ToDo (keys/values from the downsampled input) or random pruning around diffusers' own
    processor, on the self-attentions whose token count ``grids`` lists (N -> (h, w, level))."""

    def __init__(self, method: str, grids: dict, levels: dict, noises: list | None = None, ratio: float = 0.0):
        self.method, self.grids, self.levels, self.noises, self.ratio = method, grids, levels, noises, ratio
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        N = hidden_states.shape[1]
        if encoder_hidden_states is not None or N not in self.grids or self.grids[N][2] not in self.levels:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        h, w, level = self.grids[N]
        if self.method == "todo":
            kv = ref_downsample(hidden_states, h, w, **self.levels[level])
            return self.inner(attn, hidden_states, kv)
        prune, recover = ref_random(self.noises.pop(0), h, w, self.ratio)
        return recover(self.inner(attn, prune(hidden_states)))


def install(model: torch.nn.Module, processor: RefProcessor) -> torch.nn.Module:
    from diffusers.models.attention import BasicTransformerBlock

    for mod in model.modules():
        if isinstance(mod, BasicTransformerBlock):
            mod.attn1.set_processor(processor)
    return model


@pytest.fixture(scope="module")
def sd15():
    model = models.unet(models.SD15_TINY)
    return model, models.unet_inputs(model, 16)[0]


# ----------------------------------------------------------------------------------------------- ToDo

@pytest.mark.parametrize("H, W", [(8, 8), (12, 10), (7, 9), (16, 12)])
@pytest.mark.parametrize("method", ["nearest-exact", "nearest", "avg_pool", "max_pool"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_todo_downsample_equals_the_official_op(H, W, method, factor):
    x = torch.randn(2, H * W, 6, dtype=torch.float64)
    cfg, geo, m = ToDoConfig(factor=factor, downsample_method=method), SiteGeometry(2, H * W, 6, H, W), ToDo()
    kv = m.reduce(cfg, m.plan(cfg, geo, x), x)
    assert kv.shape == (2, (H // factor) * (W // factor), 6) == (2, m.budget(cfg, geo), 6)
    torch.testing.assert_close(kv, ref_downsample(x, H, W, method, factor), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.6])
@pytest.mark.parametrize("method", ["nearest-exact", "nearest"])
def test_todo_fractional_ratio_is_a_nearest_resize(ratio, method):
    H, W = 16, 12
    s = math.sqrt(1 - ratio)
    size = (math.floor(H * s + 0.5), math.floor(W * s + 0.5))  # the documented rule: round(H * s) x round(W * s)
    x = torch.randn(2, H * W, 4, dtype=torch.float64)
    cfg, geo, m = parse_options({"method": "todo", "ratio": ratio, "downsample_method": method}), \
        SiteGeometry(2, H * W, 4, H, W), ToDo()
    assert cfg.effective_factor is None and m.budget(cfg, geo) == size[0] * size[1]
    torch.testing.assert_close(m.reduce(cfg, m.plan(cfg, geo, x), x), ref_downsample(x, H, W, method, size=size),
                               rtol=0, atol=0)


def test_todo_index_rule_is_exact_where_float32_interpolate_rounds_down():
    # 26 -> 22 rows: 11 * 26 / 22 = 13 exactly; F.interpolate's float32 index math picks 12 (documented deviation)
    assert pick(26, 22, exact=False, device=torch.device("cpu"))[11] == 13
    assert pick(8, 4, exact=True, device=torch.device("cpu")).tolist() == [1, 3, 5, 7]  # i*f + f//2


@pytest.mark.parametrize("options, words", [
    ({"ratio": 0.5, "factor": 2}, ["contradicts factor 2", "0.7500"]),
    ({"ratio": 0.5, "downsample_method": "avg_pool"}, ["needs an integer factor"]),
    ({"scope": "self+cross"}, ["scope must be 'self'"]),
    ({"factor_level_2": 2}, ["max_downsample >= 2"]),
    ({"downsample_method": "bilinear"}, ["nearest-exact", "avg_pool"]),
    ({"factor": 0}, ["factor must be an integer >= 1"]),
    ({"sx": 3}, ["'factor'"]),
])
def test_todo_rejects_contradictory_options(options, words):
    with pytest.raises(ValueError) as info:
        parse_options({"method": "todo", **options})
    for word in words:
        assert word in str(info.value)


def test_todo_ratio_and_factor_are_one_knob():
    import dataclasses

    default = ToDoConfig()
    assert default.effective_factor == 2 and default.ratio == 0.75  # the official default
    assert parse_options({"method": "todo", "factor": 3}).ratio == pytest.approx(8 / 9)
    assert parse_options({"method": "todo", "ratio": 0.9375}).effective_factor == 4
    assert parse_options({"method": "todo", "ratio": 0.75, "factor": 2}).effective_factor == 2
    assert parse_options({"method": "todo", "factor": 1}).ratio == 0.0  # factor 1 = unchanged
    assert dataclasses.replace(default, ratio=0.5).effective_factor is None  # a sweep may override the ratio


TODO_CASES = [
    ({"max_downsample": 2}, {1: {"method": "nearest-exact", "factor": 2}}, 3, 64),  # level 2 seen, left alone
    ({"downsample_method": "nearest", "factor": 4}, {1: {"method": "nearest", "factor": 4}}, 3, 16),
    ({"downsample_method": "avg_pool", "factor_level_2": 2, "max_downsample": 2},
     {1: {"method": "avg_pool", "factor": 2}, 2: {"method": "avg_pool", "factor": 2}}, 7, None),
    ({"ratio": 0.5}, {1: {"method": "nearest-exact", "size": (11, 11)}}, 3, 121),
]


@pytest.mark.parametrize("options, levels, n_pruned, K", TODO_CASES)
def test_todo_matches_the_reference_processor(sd15, options, levels, n_pruned, K):
    model, args = sd15
    fast, cap = compile_with(model, method="todo", **options)
    out = fast(*args).sample
    ref = install(copy.deepcopy(model), RefProcessor("todo", SD15_GRIDS, levels))(*args).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert cap.report.count("pruned", "self") == n_pruned and rel_err(out, model(*args).sample) > 1e-4
    # the rewrite fired: one reduce per site, queries on all N tokens, keys/values on M, no restore
    attn = cap.nodes_named("graphprune_attention")
    assert len(attn) == n_pruned == len(cap.nodes_named("graphprune_todo_reduce"))
    assert not cap.nodes_named("graphprune_todo_restore")
    for node in attn:
        q, kv = (tuple(a.meta["example_value"].shape) for a in node.args[:2])
        assert q[1] in SD15_GRIDS and (kv[1] == K if K else kv[1] == q[1] // 4)
    sdpa = [n for n in cap.graphs[0].graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == 14 - n_pruned
    if options.get("max_downsample") == 2 and "factor_level_2" not in options:  # the level rule is reported
        level2 = [s for s in cap.report.sites if s.kind == "self" and s.level == 2]
        assert len(level2) == 4 and all(s.status == "skipped" and "factor_level_2=1" in s.reason for s in level2)


def test_todo_levels_beyond_2_are_skipped_with_a_reason():
    from graphprune.methods import SiteSkip

    with pytest.raises(SiteSkip, match="levels 1 and 2 only"):
        ToDo().budget(ToDoConfig(max_downsample=4), SiteGeometry(2, 16, 8, 4, 4, level=4))


# ----------------------------------------------------------------------------------------------- random

@pytest.mark.parametrize("H, W", [(8, 8), (7, 9)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_random_plan_equals_the_reference(H, W, ratio):
    N = H * W
    noise = torch.randn(3, N, generator=torch.Generator().manual_seed(int(ratio * 10)))
    cfg, geo, m = RandomConfig(ratio=ratio), SiteGeometry(3, N, 8, H, W), RandomPrune()
    plan = m.plan(cfg, geo, torch.zeros(3, N, 8), noise)
    assert plan[0].shape == (3, N - int(N * ratio)) == (3, m.budget(cfg, geo))
    prune, recover = ref_random(noise, H, W, ratio)
    x = torch.randn(3, N, 5, dtype=torch.float64)
    f = lambda t: t * 2 - 1  # any per-token function
    torch.testing.assert_close(m.restore(cfg, plan, f(m.reduce(cfg, plan, x))), recover(f(prune(x))), rtol=0, atol=0)


def test_random_ties_go_to_the_lowest_raster_index():
    # 1 x 3 grid, keep tokens 0 and 2: token 1 is equidistant and copies token 0
    noise = torch.tensor([[0.0, 1.0, -1.0]])
    keep, slot = RandomPrune().plan(RandomConfig(ratio=0.34), SiteGeometry(1, 3, 1, 1, 3), torch.zeros(1, 3, 1), noise)
    assert keep.tolist() == [[0, 2]] and slot.tolist() == [[0, 0, 1]]


def test_random_kept_set_is_uniform():
    """Every token is kept with probability K / N and batch elements draw independently."""
    g = torch.Generator().manual_seed(0)
    cfg, geo, m = RandomConfig(ratio=0.75), SiteGeometry(2, 16, 1, 4, 4), RandomPrune()
    counts, same = torch.zeros(16), 0
    draws = 3000
    for _ in range(draws):
        keep, _ = m.plan(cfg, geo, torch.zeros(2, 16, 1), torch.randn(2, 16, generator=g))
        counts += torch.zeros(16).index_add_(0, keep[0], torch.ones(4))
        same += int(torch.equal(keep[0], keep[1]))
    freq = counts / draws
    assert (freq - 0.25).abs().max() < 4 * math.sqrt(0.25 * 0.75 / draws)
    assert same < draws * 0.01  # 1 / C(16, 4) = 1/1820 per draw


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_random_matches_the_reference_processor(sd15, ratio, monkeypatch):
    model, args = sd15
    drawn: list[list[torch.Tensor]] = []
    draw = RandomFeed.draw
    monkeypatch.setattr(RandomFeed, "draw", lambda self: drawn.append(draw(self)) or drawn[-1])
    fast, cap = compile_with(model, method="random", ratio=ratio)
    out = fast(*args).sample
    assert cap.report.count("pruned", "self") == 3 and cap.report.random_inputs == 3 and len(drawn) == 1
    assert all(t.shape == (2, 256) for t in drawn[0])
    ref = install(copy.deepcopy(model), RefProcessor("random", SD15_GRIDS, {1: {}}, list(drawn[0]), ratio))
    torch.testing.assert_close(out, ref(*args).sample, rtol=1e-5, atol=1e-5)
    K = 256 - int(256 * ratio)
    attn = cap.nodes_named("graphprune_attention")
    assert len(attn) == 3 and all(n.args[0].meta["example_value"].shape[1] == K for n in attn)


def test_random_seed_is_ours_fresh_per_call_and_user_rng_untouched():
    from graphprune.archs import build_model, example_inputs

    model = build_model("pixart-tiny")
    args, kwargs = example_inputs(model, latent=16)
    outs = {}
    for seed in (0, 0, 1):
        torch._dynamo.reset()
        fast, _ = compile_with(model, method="random", ratio=0.5, seed=seed)
        state = torch.get_rng_state()
        a, b = fast(*args, **kwargs).sample, fast(*args, **kwargs).sample
        assert torch.equal(state, torch.get_rng_state()) and not torch.equal(a, b)
        outs.setdefault(seed, []).append(a)
    assert torch.equal(outs[0][0], outs[0][1]) and not torch.equal(outs[0][0], outs[1][0])


# ----------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("method, options", [("todo", {}), ("todo", {"downsample_method": "avg_pool"}),
                                             ("random", {"ratio": 0.5})])
def test_rewritten_graph_exports_to_onnx(method, options):
    """The rewritten Dynamo graph goes through torch.onnx.export(dynamo=True) and runs in onnxruntime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    block = models.HandAttentionBlock().eval()
    img = torch.randn(2, 4, 8, 8)
    grabbed = {}

    def backend(gm, example_inputs):
        fn = graphprune_backend(gm, example_inputs, options={"method": method, "compiler": "eager", **options})
        grabbed["gm"], grabbed["inputs"] = fn.graphprune_graph, list(example_inputs)
        return fn

    torch.compile(block, backend=backend)(img)
    gm, inputs = grabbed["gm"], grabbed["inputs"]
    inputs += [torch.randn(2, 64) for n in gm.graph.nodes if n.op == "placeholder" and "graphprune_random" in n.name]
    program = torch.onnx.export(gm.eval(), tuple(inputs), dynamo=True)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert not ops & {"NonZero", "Loop", "If", "ScatterND"}, ops
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]
    want = gm(*inputs)
    want = want[0] if isinstance(want, (tuple, list)) else want
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
