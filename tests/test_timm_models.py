"""Registry-wide sweep: every `xw_*` model xwlearn registers with timm follows the timm protocol.

Every model is built and its classifier reset; the forward pass (224², `forward_features` / `forward_head` /
`features_only`) runs for the smallest model of each family, since the large ones only repeat the same code at more
FLOPs (their parameter counts are checked against the papers in each model's own tests)."""
import re
import pytest
import torch
import timm
import xwlearn.models  # registers every xw_* model with timm, as timm/models/__init__.py does for timm's own

MODELS = sorted(timm.list_models("xw_*"))
_FAMILY = lambda n: re.sub(r"_(tiny|small|base|large|stl|\d+g)$", "", n)
_SMALLEST = {"xw_biformer_tiny", "xw_glnet_4g"}

def test_models_are_registered():
    assert {"xw_biformer_tiny", "xw_biformer_small", "xw_biformer_base",
            "xw_glnet_4g", "xw_glnet_9g", "xw_glnet_16g", "xw_glnet_stl"} <= set(MODELS)
    for fam in {_FAMILY(m) for m in MODELS}: assert any(_FAMILY(s) == fam for s in _SMALLEST), f"no forward check for {fam}"

@pytest.mark.parametrize("name", MODELS)
def test_build_and_reset(name):
    m = timm.create_model(name, pretrained=False, num_classes=7)
    assert m.num_classes == 7 and m.get_classifier().out_features == 7
    m.reset_classifier(3)
    assert m.get_classifier().out_features == 3
    info = m.feature_info
    assert len(info) >= 3 and [f["reduction"] for f in info] == sorted(f["reduction"] for f in info)
    assert m.default_cfg["input_size"][0] == 3

@pytest.mark.parametrize("name", sorted(_SMALLEST))
def test_forward_protocol(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=7).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert m.forward_head(feats).shape == (1, 7)
        assert m.forward_head(feats, pre_logits=True).shape == (1, m.num_features)
        m.reset_classifier(3)
        assert m(x).shape == (1, 3)
    fm = timm.create_model(name, pretrained=False, features_only=True).eval()
    with torch.no_grad(): outs = fm(x)
    assert [o.shape[1] for o in outs] == fm.feature_info.channels()
    assert [224 // o.shape[-1] for o in outs] == fm.feature_info.reduction()
