"""GLMix / GLNet (`xwlearn.models.glmix`, and the reproduction's pieces in `xwlearn.repro.glmix`) against independent references.

The references below are written from the paper's equations and the official model definitions
(rayleizhu/GLMix, `models/glnet.py`): explicit-softmax clustering/dispatch, and a closed-form parameter count per
block — deliberately not sharing code with the module under test.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import timm

import json
from pathlib import Path

from xwlearn.models.glmix import (GLMixBlock, MHSABlock, GLNet, Attention, slot_logits, soft_cluster, soft_dispatch,
                                  count_macs, GLNET_PARAMS, GLNET_PAPER, convert_official_glnet, checkpoint_filter_fn,
                                  load_official_glnet)
from xwlearn.repro.glmix import make_scenes, fg_ari, slot_maps, GLMIX_TINY

torch.set_num_threads(1)
NAMES = ['xw_glnet_4g', 'xw_glnet_9g', 'xw_glnet_16g', 'xw_glnet_stl']


# ---------------------------------------------------------------- parameter counts, from the official definitions
def _ln(c): return 2 * c
def _conv(ci, co, k, groups=1, bias=True): return co * (ci // groups) * k * k + (co if bias else 0)
def _mha(c): return 4 * c * c + 4 * c
def _mlp(c, r, dw):
    h = int(r * c)
    return _conv(c, h, 1) + (_conv(h, h, 3, h) if dw else 0) + _conv(h, c, 1)
def _glmix(c, r, cpe, dw, ls):
    return (1 + (_conv(c, c, cpe, c) if cpe else 0) + _ln(c) + _mha(c) + _conv(c, c, 1) + _conv(c, c, 5, c)
            + _conv(c, c, 1) + _ln(c) + _mlp(c, r, dw) + (2 * c if ls else 0))
def _mhsa(c, r, cpe, dw, ls):
    return (_conv(c, c, cpe, c) if cpe else 0) + _ln(c) + _mha(c) + _ln(c) + _mlp(c, r, dw) + (2 * c if ls else 0)
def _bn(c): return 2 * c

def official_count(depths, dims, modes, r, cpe, dw, ls, stem):
    n = 0
    if stem == 'ovlp':
        n += _conv(3, dims[0] // 2, 3) + _bn(dims[0] // 2) + _conv(dims[0] // 2, dims[0], 3) + _bn(dims[0])
        n += sum(_conv(dims[i], dims[i + 1], 3) + _bn(dims[i + 1]) for i in range(3))
    else:
        n += _conv(3, dims[0], 4) + _bn(dims[0]) + sum(_bn(dims[i]) + _conv(dims[i], dims[i + 1], 2) for i in range(3))
    for d, c, mode in zip(depths, dims, modes):
        for j in range(d):
            kind = mode if mode != 'glmix.mhsa' else ('glmix' if j % 2 == 0 else 'mhsa')
            n += (_glmix if kind == 'glmix' else _mhsa)(c, r, cpe, dw, ls)
    return n + _bn(dims[-1]) + dims[-1] * 1000 + 1000

OFFICIAL = {
    'xw_glnet_4g': official_count((4, 4, 18, 4), (64, 128, 256, 512), ('glmix', 'glmix', 'glmix.mhsa', 'mhsa'), 3, 3, True, False, 'ovlp'),
    'xw_glnet_9g': official_count((4, 4, 18, 4), (96, 192, 384, 768), ('glmix', 'glmix', 'glmix.mhsa', 'mhsa'), 3, 3, True, False, 'ovlp'),
    'xw_glnet_16g': official_count((4, 4, 18, 4), (128, 256, 512, 1024), ('glmix', 'glmix', 'glmix.mhsa', 'mhsa'), 3, 3, True, True, 'ovlp'),
    'xw_glnet_stl': official_count((2, 2, 6, 2), (96, 192, 384, 768), ('glmix', 'glmix', 'glmix', 'mhsa'), 4, 0, False, False, 'patch'),
}
README_M = {'xw_glnet_4g': 27, 'xw_glnet_9g': 60, 'xw_glnet_16g': 106, 'xw_glnet_stl': 30}   # model card, M params
README_G = {'xw_glnet_4g': 4.5, 'xw_glnet_9g': 9.7, 'xw_glnet_16g': 16.7, 'xw_glnet_stl': 4.4}  # model card, GFLOPs


@pytest.mark.parametrize('name', NAMES)
def test_param_count_matches_official(name):
    with torch.device('meta'): m = timm.create_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert n == OFFICIAL[name] == GLNET_PARAMS[name]
    assert round(n / 1e6) == README_M[name] == GLNET_PAPER[name][0]


@pytest.mark.parametrize('name', ['xw_glnet_4g', 'xw_glnet_stl'])
def test_flops_near_paper(name):
    with torch.device('meta'): m = timm.create_model(name)
    g = count_macs(m) / 1e9
    assert abs(g - README_G[name]) / README_G[name] < 0.03, g


# ---------------------------------------------------------------- the soft clustering / dispatch as attention
def test_cluster_dispatch_equal_explicit_softmax_and_grads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 12, generator=g, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(1, 9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    s1 = torch.randn(2, 9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    xn, sn = x / x.norm(dim=-1, keepdim=True), s0 / s0.norm(dim=-1, keepdim=True)
    L = tau * torch.einsum('bsc,bnc->bsn', sn.expand(2, -1, -1), xn)
    torch.testing.assert_close(slot_logits(x, s0, tau), L)
    ref_c = torch.exp(L - L.amax(-1, keepdim=True)); ref_c = (ref_c / ref_c.sum(-1, keepdim=True)) @ x
    Lt = L.transpose(1, 2); ref_d = torch.exp(Lt - Lt.amax(-1, keepdim=True)); ref_d = (ref_d / ref_d.sum(-1, keepdim=True)) @ s1
    for ref, out in ((ref_c, soft_cluster(x, s0, tau)), (ref_d, soft_dispatch(x, s0, s1, tau))):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(ref.cos().sum(), (x, s0, tau), allow_unused=True, retain_graph=True),
                        torch.autograd.grad(out.cos().sum(), (x, s0, tau), allow_unused=True)):
            if a is not None: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, s0, t: soft_cluster(x, s0, t), (x[:1, :6, :4].detach().requires_grad_(),
                                    s0[:, :3, :4].detach().requires_grad_(), tau))


@pytest.mark.parametrize('slot_init', ['ada_avgpool', 'param'])
def test_block_fused_equals_explicit(slot_init):
    torch.manual_seed(1)
    b = GLMixBlock(24, 3, num_slots=9, slot_init=slot_init, cpe_ks=3, mlp_dw=True, layerscale=0.5, fused=True).eval()
    with torch.no_grad(): b.scale.fill_(4.0)
    x = torch.randn(2, 24, 7, 9)
    with torch.no_grad():
        y1 = b(x); b.record = True; y2 = b(x); b.record = False
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    assert b.logits.shape == (2, 9, 63)


def test_block_set_part_is_permutation_equivariant():
    "Without the local branch and CPE, the GLMix mixer with learned slots treats pixels as a set."
    torch.manual_seed(2)
    b = GLMixBlock(16, 2, num_slots=4, slot_init='param', local_ks=0).eval()
    x = torch.randn(1, 16, 5, 5); perm = torch.randperm(25)
    xp = x.flatten(2)[:, :, perm].reshape(1, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(b(xp).flatten(2), b(x).flatten(2)[:, :, perm], rtol=1e-5, atol=1e-5)


def test_attention_matches_nn_multihead():
    torch.manual_seed(3)
    mha, att = torch.nn.MultiheadAttention(32, 4, batch_first=True), Attention(32, 4)
    with torch.no_grad():
        att.qkv.weight.copy_(mha.in_proj_weight); att.qkv.bias.copy_(mha.in_proj_bias)
        att.proj.weight.copy_(mha.out_proj.weight); att.proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(att(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- timm protocol, registry-wide (small inputs)
@pytest.mark.parametrize('name', NAMES)
def test_timm_protocol(name):
    torch.manual_seed(4)
    m = timm.create_model(name, num_classes=3, depths=(1, 1, 2, 1))
    x = torch.randn(2, 3, 64, 64)
    out = m(x); assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    f = m.forward_features(x); assert f.shape == (2, m.num_features, 2, 2)
    assert m.forward_head(f, pre_logits=True).shape == (2, m.num_features)
    m.reset_classifier(0); assert m(x).shape == (2, m.num_features)
    fm = timm.create_model(name, features_only=True, depths=(1, 1, 2, 1)).eval()
    outs = fm(x)
    assert [o.shape[1] for o in outs] == fm.feature_info.channels()
    assert [64 // o.shape[-1] for o in outs] == fm.feature_info.reduction() == [4, 8, 16, 32]
    cfg = m.pretrained_cfg; assert cfg['pool_size'] == (7, 7) and cfg['num_classes'] == 1000


def test_odd_sizes_and_bad_input():
    m = timm.create_model('xw_glnet_4g', num_classes=2, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)).eval()
    with torch.no_grad():
        for h, w in [(33, 47), (17, 17), (96, 40)]: assert m(torch.randn(1, 3, h, w)).shape == (1, 2)
    with pytest.raises(RuntimeError, match='expected input'): m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match='square'): GLMixBlock(16, 2, num_slots=10)
    with pytest.raises(ValueError, match='no pretrained'): timm.create_model('xw_glnet_9g', pretrained=True)


def test_drop_path_and_layerscale_wiring():
    m = timm.create_model('xw_glnet_16g', drop_path_rate=0.4, depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))
    dps = [getattr(b.drop_path, 'drop_prob', 0.0) for s in m.stages for b in list(s)[1:]]   # first block: rate 0, Identity
    np.testing.assert_allclose(dps, np.linspace(0, 0.4, 5))
    assert all(b.ls1.gamma.shape == (b.norm1.normalized_shape[0],) for s in m.stages for b in list(s)[1:])


# ---------------------------------------------------------------- the reproduction's pieces
def test_scenes_deterministic_and_consistent():
    a = make_scenes(16, seed=3); b = make_scenes(16, seed=3); c = make_scenes(16, seed=4)
    for u, v in zip(a, b): np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    ims, ys, ms = a
    assert ims.dtype == np.uint8 and ys.dtype == np.float32 and ms.dtype == np.int64
    assert (ms.max((1, 2)) == ys.sum(1)).all()                        # one mask id per present class


def test_scenes_hide_no_object_beyond_max_overlap():
    "Each object keeps >= 85 % of its full shape visible (the old check compared the overlap with the new shape's area)."
    ims, ys, ms, areas = make_scenes(300, seed=5, return_areas=True)
    vis = np.stack([(ms == k).sum((1, 2)) for k in range(1, areas.shape[1] + 1)], 1)
    assert (vis[areas == 0] == 0).all() and ((areas > 0).sum(1) == ys.sum(1)).all()
    hidden = 1 - vis[areas > 0] / areas[areas > 0]
    assert hidden.max() <= 0.15 + 1e-9
    _, _, ms2, areas2 = make_scenes(300, seed=5, return_areas=True, max_overlap=1.0)      # no check: objects do get hidden
    vis2 = np.stack([(ms2 == k).sum((1, 2)) for k in range(1, 4)], 1)
    assert (1 - vis2[areas2 > 0] / areas2[areas2 > 0]).max() > 0.3


def test_slot_maps_cosine_reads_through_negative_tau():
    "With τ < 0 the logits' arg-max is the least similar slot; by='cosine' gives the most similar one."
    torch.manual_seed(7)
    m = GLNet(**GLMIX_TINY)
    blocks = [b for b in m.modules() if isinstance(b, GLMixBlock)]
    x = torch.randn(2, 3, 32, 32)
    pos = slot_maps(m, x, by='cosine')
    with torch.no_grad():
        for b in blocks: b.scale.mul_(-1)
    neg_logits, neg_cos = slot_maps(m, x), slot_maps(m, x, by='cosine')
    for a, c in zip(pos, neg_cos): assert torch.equal(a, c)
    assert not any(torch.equal(a, c) for a, c in zip(pos, neg_logits))
    with pytest.raises(ValueError, match='by'): slot_maps(m, x, by='tau')


def test_fg_ari_and_slot_maps():
    t = np.zeros((1, 8, 8), dtype=np.int64); t[0, :, :4] = 1; t[0, :, 4:] = 2
    assert fg_ari(torch.tensor(t[:, ::2, ::2]), t) == pytest.approx(1.0)
    assert fg_ari(torch.tensor(3 - t[:, ::2, ::2]), t) == pytest.approx(1.0)      # label names do not matter
    assert fg_ari(torch.zeros(1, 4, 4, dtype=torch.long), t) == pytest.approx(0.0)
    m = GLNet(**GLMIX_TINY)
    maps = slot_maps(m, torch.randn(2, 3, 32, 32))
    assert [tuple(s.shape) for s in maps] == [(2, 16, 16), (2, 16, 16), (2, 8, 8), (2, 8, 8)]
    assert not any(b.record for b in m.modules() if isinstance(b, GLMixBlock))


def test_registered():
    from xwlearn.core import REPRODUCTIONS, RECIPES
    assert REPRODUCTIONS['glmix'].paper == 'glmix'
    r = RECIPES['glmix_imagenet_glnet_4g']
    assert r.paper == 'glmix' and r.dataset == 'imagenet' and r.epochs == 300
    assert set(NAMES) <= set(timm.list_models('xw_glnet*'))


# ---------------------------------------------------------------- official checkpoints
# Key names, shapes and dtypes of the official state dicts, written once from rayleizhu/GLMix `models/glnet.py`
# (commit 3c93dbf) instantiated with random weights in a scratch script -- not derived from our mapping.
MANIFEST = json.loads((Path(__file__).parent / 'fixtures' / 'glnet_official_keys.json').read_text())


def _official_random(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randint(0, 9, s, generator=g) if d == 'int64' else torch.randn(s, generator=g) * 0.05
          for k, s, d in MANIFEST[name]}
    for k in sd:
        if k.endswith('running_var'): sd[k] = sd[k].abs() + 1     # a valid BatchNorm state
    return sd


@pytest.mark.parametrize('name', ['glnet_4g', 'glnet_9g', 'glnet_16g', 'glnet_stl'])
def test_official_layout_converts_exactly(name):
    "Every official tensor lands, unchanged (a view, at most reshaped), on exactly one of our keys; the load is strict."
    sd = _official_random(name)
    conv = convert_official_glnet(sd)
    with torch.device('meta'): m = timm.create_model('xw_' + name)
    ours = m.state_dict()
    assert set(conv) == set(ours)
    assert all(conv[k].shape == ours[k].shape for k in ours)
    assert sorted(v.data_ptr() for v in conv.values()) == sorted(v.data_ptr() for v in sd.values())
    m.load_state_dict(conv, strict=True, assign=True)
    assert checkpoint_filter_fn(conv) is conv                              # our own layout passes through


def test_official_checkpoint_loads_three_ways(tmp_path):
    "`load_official_glnet`, timm's `pretrained_cfg_overlay=dict(file=...)` and a direct load give identical logits."
    sd = _official_random('glnet_stl', seed=1)
    path = tmp_path / 'glnet_stl.pth'
    torch.save({'model': sd, 'epoch': 299}, path)
    x = torch.randn(1, 3, 64, 64)
    direct = timm.create_model('xw_glnet_stl').eval()
    direct.load_state_dict(convert_official_glnet(sd), strict=True)
    a = load_official_glnet(path)
    b = timm.create_model('xw_glnet_stl', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        ref = direct(x)
        torch.testing.assert_close(a(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(b(x), ref, rtol=0, atol=0)
    assert type(a).__name__ == 'GLNet' and not a.training
    with pytest.raises(ValueError, match='pretrained_cfg_overlay'): timm.create_model('xw_glnet_4g', pretrained=True)
    with pytest.raises(ValueError, match='not an official GLNet key'): convert_official_glnet({'blocks.0.x': x})


# ---------------------------------------------------------------- timm features API: forward_intermediates, FX
def test_forward_intermediates_and_prune():
    torch.manual_seed(5)
    m = timm.create_model('xw_glnet_4g', num_classes=5, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
        assert [t.shape[1:] for t in inter] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
        h, stages = m.stem(x), []
        for s in m.stages: h = s(h); stages.append(h)
        for a, b in zip(inter, stages): torch.testing.assert_close(a, b, rtol=0, atol=0)
        only = m.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        torch.testing.assert_close(only[0], stages[1]); torch.testing.assert_close(only[1], m.norm(stages[3]))
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [64, 128]
        early, inter = m.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early, stages[1])
    with pytest.raises(ValueError, match='output_fmt'): m.forward_intermediates(x, output_fmt='NHWC')
    kept = m.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(m.stages) == 2 and m.num_features == 32 and isinstance(m.head, torch.nn.Identity)
    with torch.no_grad(): assert m(x).shape == (2, 32, 8, 8)                  # global_pool '': the map, as timm's models


def test_fx_traceable():
    "timm's FX feature extraction traces the whole model (no Python shape unpacking in the forward)."
    from timm.models import get_graph_node_names, create_feature_extractor
    torch.manual_seed(6)
    m = timm.create_model('xw_glnet_stl', num_classes=4, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)).eval()
    x = torch.randn(2, 3, 64, 64)
    _, nodes = get_graph_node_names(m)
    fe = create_feature_extractor(m, return_nodes={nodes[-1]: 'out'})
    with torch.no_grad(): torch.testing.assert_close(fe(x)['out'], m(x), rtol=0, atol=0)
    fm = timm.create_model('xw_glnet_4g', features_only=True, feature_cls='fx', depths=(1, 1, 2, 1),
                           dims=(16, 32, 64, 128)).eval()
    with torch.no_grad(): assert [o.shape[1] for o in fm(x)] == [16, 32, 64, 128]
