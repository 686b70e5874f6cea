import json

import pytest

import torch

from graphprune.config import config_to_dict
from graphprune.methods import (AtEdmConfig, SiToConfig, ToMeConfig, config_from_dict, method_names,
                                parse_options)


def test_defaults_and_typed_configs():
    cfg = parse_options({"method": "sito", "ratio": 0.5})
    assert isinstance(cfg, SiToConfig) and cfg.ratio == 0.5 and cfg.scope == ("self",)
    assert cfg.compiler == "inductor" and cfg.max_downsample == 1
    typed = ToMeConfig(ratio=0.3, use_rand=False)
    assert parse_options(typed) is typed
    assert {"tome", "sito", "todo", "random"} <= set(method_names())


@pytest.mark.parametrize("options, words", [
    ({"method": "nope"}, ["unknown method", "sito", "tome"]),
    ({"method": "sito", "ratoi": 0.5}, ["unknown option", "ratoi", "ratio", "noise_alpha"]),
    ({"method": "tome", "ratio": 1.0}, ["0 <= ratio < 1"]),
    ({"method": "tome", "ratio": -0.1}, ["0 <= ratio < 1"]),
    ({"method": "sito", "ratio": 0.8}, ["0.75", "sx"]),
    ({"method": "sito", "compiler": "tvm"}, ["unknown compiler", "inductor", "eager"]),
    ({"method": "sito", "scope": "self+mlp"}, ["unknown scope", "ff"]),
    ({"method": "sito", "scope": "cross"}, ["must include 'self'"]),
    ({"method": "sito", "recover": "avg"}, ["kept", "base"]),
    ({"method": "sito", "mode": "fastest"}, ["unknown Inductor mode", "max-autotune"]),
    ({"method": "sito", "mode": "max-autotune", "compiler": "eager"}, ["needs compiler='inductor'"]),
    ({"method": "tome", "sx": 0}, ["sx must be an integer >= 1"]),
])
def test_bad_options_name_the_fix(options, words):
    with pytest.raises(ValueError) as info:
        parse_options(options)
    for word in words:
        assert word in str(info.value)


def test_scope_forms_and_larger_cells():
    assert parse_options({"method": "tome", "scope": "self+cross+ff"}).scope == ("self", "cross", "ff")
    assert parse_options({"method": "tome", "scope": ["ff", "self"]}).scope == ("self", "ff")
    assert parse_options({"method": "sito", "ratio": 0.85, "sx": 3, "sy": 3}).ratio == 0.85


@pytest.mark.parametrize("cfg", [SiToConfig(ratio=0.7, recover="base", scope="self+cross"),
                                 ToMeConfig(ratio=0.25, use_rand=False, max_downsample=2),
                                 SiToConfig(ratio=0.5, scope="block"),
                                 AtEdmConfig(iterations=3, dsap_blocks=["mid_block.attentions.0"], dagger=True)])
def test_json_round_trip(cfg):
    blob = json.dumps(config_to_dict(cfg))
    assert config_from_dict(blob) == cfg
    assert json.loads(blob)["_type"] == cfg.method


def test_backend_rejects_bad_options_through_torch_compile():
    model = torch.nn.Linear(4, 4)
    fast = torch.compile(model, backend="graphprune", options={"method": "sito", "bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        fast(torch.randn(2, 4))


def test_every_builtin_method_is_registered():
    names = {"tome", "sito", "todo", "random", "deepcache", "dato", "catome", "atedm"}
    assert set(method_names()) == names


def test_typed_config_through_torch_compile():
    import graphprune
    from models import HandAttentionBlock

    block = HandAttentionBlock().eval()
    fast = torch.compile(block, backend="graphprune",
                         options=graphprune.ToMeConfig(ratio=0.5, use_rand=False, compiler="eager"))
    fast(torch.randn(2, 4, 8, 8))
    report = graphprune.last_report()
    assert report.config["_type"] == "tome" and report.count("pruned") == 1 and report.sites[0].K == 32
