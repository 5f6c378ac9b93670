"""timm conformance of every `xw_*` model xwlearn registers (written for xwlearn, in the spirit of timm's tests/test_models.py).

Every model: its default cfg is checked on the meta device (free). The smallest model of each family (the larger ones
repeat the same code at more FLOPs) runs, at the input sizes timm's own tests would pick from the cfg: forward,
backward, `features_only`, `forward_intermediates` / `prune_intermediate_layers`, and an FX graph through timm's
feature-extraction tracer. TorchScript is not supported (documented in each model's notebook) and not tested."""
import inspect, re
import pytest
import torch
import timm
from timm.layers import create_feature_extractor, get_graph_node_names
import xwlearn.models  # registers every xw_* model with timm, as timm/models/__init__.py does for timm's own

MODELS = sorted(timm.list_models("xw_*"))
_FAMILY = lambda n: re.sub(r"_(tiny|small|base|large|stl|\d+g)$", "", n)
_SMALLEST = ["xw_biformer_tiny", "xw_glnet_4g"]
# timm's test sizes (tests/test_models.py): forward up to 384, backward / FX targets 128, features_only target 96
TARGET_FWD, TARGET_BWD, TARGET_FEAT, TARGET_FX = 384, 128, 96, 128


def _input_size(cfg:dict, target:int) -> tuple:
    "The size timm's tests pick: the cfg's input size, or its min_input_size (else the input size clamped) above `target`."
    size = cfg["input_size"]
    if cfg.get("fixed_input_size"): return size
    if max(size) <= target: return size
    if cfg.get("min_input_size"): return cfg["min_input_size"]
    return tuple(min(s, target) for s in size)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


def test_models_are_registered():
    assert {"xw_biformer_tiny", "xw_biformer_small", "xw_biformer_base",
            "xw_glnet_4g", "xw_glnet_9g", "xw_glnet_16g", "xw_glnet_stl"} <= set(MODELS)
    for fam in {_FAMILY(m) for m in MODELS}: assert any(_FAMILY(s) == fam for s in _SMALLEST), f"no run-time check for {fam}"


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    with torch.device("meta"): m = timm.create_model(name, pretrained=False)
    cfg = m.pretrained_cfg
    C, H, W = cfg["input_size"]
    assert C == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3 and cfg["num_classes"] == m.num_classes
    if cfg.get("min_input_size"): assert all(a <= b for a, b in zip(cfg["min_input_size"], cfg["input_size"]))
    first = m.get_submodule(cfg["first_conv"])
    assert first.in_channels == 3
    head = m.get_submodule(cfg["classifier"])
    assert head is m.get_classifier() and head.out_features == cfg["num_classes"]
    red = [f["reduction"] for f in m.feature_info]
    assert len(red) >= 3 and red == sorted(red) and m.feature_info[-1]["num_chs"] == m.num_features
    assert tuple(cfg["pool_size"]) == (H // red[-1], W // red[-1])
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), torch.nn.Identity) and m.num_classes == 0
    sig = inspect.signature(m.forward_intermediates).parameters
    assert {"indices", "norm", "stop_early", "output_fmt", "intermediates_only"} <= set(sig)
    assert {"indices", "prune_norm", "prune_head"} <= set(inspect.signature(m.prune_intermediate_layers).parameters)


@pytest.mark.parametrize("name", _SMALLEST)
def test_forward_backward(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *_input_size(m.pretrained_cfg, TARGET_FWD))
    with torch.no_grad():
        feats = m.forward_features(x)
        out = m.forward_head(feats)
        assert out.shape == (1, m.num_classes) and torch.isfinite(out).all()
        assert feats.shape[-2:] == tuple(-(-s // m.feature_info[-1]["reduction"]) for s in x.shape[-2:])
        assert m.forward_head(feats, pre_logits=True).shape == (1, m.num_features)
        m.reset_classifier(0)
        assert m(x).shape == (1, m.num_features)
    m = timm.create_model(name, pretrained=False, num_classes=5).train()
    x = torch.randn(2, *_input_size(m.pretrained_cfg, TARGET_BWD))
    m(x).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", _SMALLEST)
def test_features_and_intermediates(name):
    torch.manual_seed(0); m = timm.create_model(name, pretrained=False).eval()
    torch.manual_seed(0); fm = timm.create_model(name, pretrained=False, features_only=True).eval()  # the same weights
    size = _input_size(m.pretrained_cfg, TARGET_FEAT)
    x = torch.randn(1, *size)
    n = len(m.feature_info)
    with torch.no_grad():
        outs = fm(x)
        assert [o.shape[1] for o in outs] == fm.feature_info.channels()
        assert [o.shape[-1] for o in outs] == [-(-size[-1] // r) for r in fm.feature_info.reduction()]  # stride-2 convs round up
        final, inter = m.forward_intermediates(x)
        assert len(inter) == n and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(inter, outs))
        assert torch.allclose(final, m.forward_features(x), atol=1e-5)
        only = m.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True, stop_early=True)
        assert [o.shape for o in only] == [outs[0].shape, outs[n - 2].shape]
        last = m.forward_intermediates(x, indices=1, intermediates_only=True)   # int: the last n
        assert len(last) == 1 and last[0].shape == outs[-1].shape
        kept = m.prune_intermediate_layers(indices=[0, n - 2], prune_head=True)
        assert list(kept) == [0, n - 2]
        pruned = m.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(pruned, only))


@pytest.mark.parametrize("name", _SMALLEST)
def test_fx_graph(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *_input_size(m.pretrained_cfg, TARGET_FX))
    train_nodes, eval_nodes = get_graph_node_names(m)
    fx = create_feature_extractor(m, return_nodes=[eval_nodes[-1]]).eval()
    with torch.no_grad():
        ref = m(x)
        out = fx(x)
    out = out[eval_nodes[-1]] if isinstance(out, dict) else out
    torch.testing.assert_close(out, ref)
    # timm's FX feature wrapper over feature_info (features_only=True, feature_cls='fx')
    fm = timm.create_model(name, pretrained=False, features_only=True, feature_cls="fx").eval()
    with torch.no_grad(): outs = fm(x)
    assert [o.shape[1] for o in outs] == fm.feature_info.channels()
