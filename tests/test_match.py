"""The matcher on every supported family, in Dynamo's torch-level graph and torch.export's ATen graph."""

import pytest
import torch

import models
from graphprune.passes.match import find_attention_sites
from helpers import compile_with


def dynamo_graph(model, args, kwargs):
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab, fullgraph=True)(*args, **kwargs)
    return graphs[0].graph


def export_graph(model, args, kwargs):
    return torch.export.export(model, args, kwargs).graph


def attention_modules(model):
    """Expected sites from the module tree: (path, kind, heads) of every diffusers Attention."""
    from diffusers.models.attention_processor import Attention

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            out[name] = ("cross" if mod.is_cross_attention else "self", mod.heads)
    return out


FAMILIES = {
    "sd15": (lambda: models.unet(models.SD15_TINY), lambda m: models.unet_inputs(m, 16)),
    "sd2": (lambda: models.unet(models.SD2_TINY), lambda m: models.unet_inputs(m, 16)),
    "sdxl": (lambda: models.unet(models.SDXL_TINY), lambda m: models.unet_inputs(m, 16)),
    "pixart": (models.pixart, lambda m: models.pixart_inputs()),
}


@pytest.mark.parametrize("ir", ["dynamo", "export"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_diffusers_families(family, ir):
    build, inputs = FAMILIES[family]
    model = build()
    args, kwargs = inputs(model)
    graph = (dynamo_graph if ir == "dynamo" else export_graph)(model, args, kwargs)
    sites, unmatched = find_attention_sites(graph)
    assert not unmatched, [u.reason for u in unmatched]
    expected = attention_modules(model)
    assert {s.module_path: (s.kind, s.heads) for s in sites} == expected
    for s in sites:
        assert s.grid is not None and s.grid[0] * s.grid[1] == s.N
        if s.kind == "self":
            assert s.metric_source == "pre-norm block input"
        if s.kind == "cross":
            assert s.context is not None and s.L != s.N
    if family == "sdxl":  # two transformer layers per block, no attention at the top level
        assert max(s.N for s in sites) == 64 and any("transformer_blocks.1.attn1" in s.module_path for s in sites)
    if family == "pixart":
        assert {s.grid for s in sites} == {(8, 8)}


def test_pixart_is_pruned_end_to_end():
    model = models.pixart()
    args, kwargs = models.pixart_inputs()
    fast, cap = compile_with(model, method="sito", ratio=0.5)
    out = fast(*args, **kwargs).sample
    ref = model(*args, **kwargs).sample
    assert cap.report.count("pruned", "self") == 2 and torch.isfinite(out).all()
    assert 0 < float((out - ref).norm() / ref.norm()) < 1


def test_sdxl_prunes_its_finest_attention_level():
    model = models.unet(models.SDXL_TINY)
    args, kwargs = models.unet_inputs(model, 16)
    fast, cap = compile_with(model, method="tome", ratio=0.5)
    fast(*args, **kwargs)
    pruned = cap.report.pruned
    # finest level with attention: down_blocks.1 (1 block x 2 layers) and up_blocks.1 (2 blocks x 2 layers)
    assert len(pruned) == 6 and {s.N for s in pruned} == {64}


def hand_reference(block, img, ratio, context=None):
    """The hand-written block with tomesd's merge around attention, written out in full."""
    from reference import ref_tome

    h = block.conv(img)
    B, C, H, W = h.shape
    x = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
    merge, unmerge = ref_tome(x, H, W, ratio)
    n = merge(block.norm(x))
    if block.fused:
        q, k, v = block.qkv(n).chunk(3, dim=-1)
    else:
        q, k, v = block.q(n), block.k(n), block.v(n)
    d = C // block.heads
    split = lambda t: t.reshape(B, -1, block.heads, d).transpose(1, 2)
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d ** 0.5, dim=-1) @ split(v)
    return x + unmerge(block.out(a.transpose(1, 2).reshape(B, -1, C)))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("ir", ["dynamo", "export"])
def test_hand_written_and_fused_qkv(fused, ir):
    torch.manual_seed(0)
    block = models.HandAttentionBlock(fused=fused).eval()
    img = torch.randn(2, 4, 8, 6)
    graph = (dynamo_graph if ir == "dynamo" else export_graph)(block, (img,), {})
    sites, unmatched = find_attention_sites(graph)
    assert not unmatched and len(sites) == 1
    s = sites[0]
    assert (s.kind, s.N, s.C, s.heads, s.grid) == ("self", 48, 32, 4, (8, 6))
    assert s.form == ("fused-qkv matmul-softmax" if fused else "matmul-softmax")
    assert s.scale == pytest.approx(8 ** -0.5)
    if ir == "dynamo":
        fast, cap = compile_with(block, method="tome", ratio=0.5, use_rand=False)
        torch.testing.assert_close(fast(img), hand_reference(block, img, 0.5), rtol=1e-5, atol=1e-5)
        assert cap.report.count("pruned") == 1


def test_cross_attention_is_never_taken_for_self():
    block = models.HandAttentionBlock(cross_dim=24).eval()
    img, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    fast, cap = compile_with(block, method="sito", ratio=0.5)
    torch.testing.assert_close(fast(img, ctx), block(img, ctx))
    (site,) = cap.report.sites
    assert site.kind == "cross" and site.status == "kept"


def test_sites_that_cannot_be_proved_are_left_alone_with_a_reason():
    reuse = models.HandAttentionBlock(reuse_q=True).eval()
    img = torch.randn(2, 4, 8, 8)
    fast, cap = compile_with(reuse, method="sito", ratio=0.5)
    torch.testing.assert_close(fast(img), reuse(img))
    (site,) = cap.report.sites
    assert site.status == "unmatched" and "used outside the attention" in site.reason

    torch._dynamo.reset()
    masked = models.MaskedSDPABlock().eval()
    mask = torch.rand(64, 64) > 0.2
    fast, cap = compile_with(masked, method="sito", ratio=0.5)
    torch.testing.assert_close(fast(img, mask), masked(img, mask))
    (site,) = cap.report.sites
    assert site.status == "unmatched" and "mask" in site.reason


def test_grid_too_small_is_skipped():
    block = models.HandAttentionBlock().eval()
    img = torch.randn(2, 4, 1, 5)  # a 1 x 5 grid holds no 2 x 2 cell
    fast, cap = compile_with(block, method="tome", ratio=0.5)
    torch.testing.assert_close(fast(img), block(img))
    (site,) = cap.report.sites
    assert site.status == "skipped" and "smaller than one" in site.reason


def test_model_without_attention_warns():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    fast, cap = compile_with(model, method="sito", ratio=0.5)
    fast(torch.randn(2, 4))
    assert cap.report.sites == [] and "no attention found" in cap.report.summary()


def test_nothing_pruned_is_a_warning():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    fast, _ = compile_with(model, method="tome", ratio=0.5)
    with pytest.warns(UserWarning, match="nothing pruned.*no attention found"):
        fast(torch.randn(2, 4))
