"Tests of xwlearn.models.biformer (the region-major core, the attention module, the timm models) and of xwlearn.repro.biformer (the task, the registries)."
import pytest, torch, timm
import torch.nn.functional as F
from xwlearn.models.biformer import (to_regions, from_regions, route_regions, routed_attention, routed_attention_flex,
                                     BiLevelRoutingAttention, attention_macs, count_params)
from xwlearn.repro.biformer import long_range_match, match_net


def _masked(q, k, v, idx, scale=None):
    B, h, n, t, d = q.shape
    allow = torch.zeros(B, n, n, dtype=torch.bool).scatter_(2, idx, True)
    m = allow.repeat_interleave(t, 1).repeat_interleave(t, 2)[:, None]
    f = lambda x: x.reshape(B, h, n * t, d)
    return F.scaled_dot_product_attention(f(q), f(k), f(v), attn_mask=m, scale=scale).reshape(B, h, n, t, d)


def _qkv(B, h, n, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, t, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("H,W,S", [(4, 6, 2), (14, 14, 7), (9, 3, 3), (8, 8, 1)])
def test_regions_round_trip(H, W, S):
    x = torch.randn(2, H, W, 5)
    r = to_regions(x, S)
    assert r.shape == (2, S * S, (H // S) * (W // S), 5)
    assert torch.equal(from_regions(r, S, H, W), x)
    assert torch.equal(r[:, 0], x[:, :H // S, :W // S].reshape(2, -1, 5))


def test_regions_bad_size_message():
    with pytest.raises(ValueError, match="multiples of 7"): to_regions(torch.zeros(1, 10, 14, 3), 7)


@pytest.mark.parametrize("B,h,S,t,d,k", [(2, 2, 4, 4, 8, 3), (1, 3, 3, 9, 4, 2), (2, 1, 2, 49, 16, 1), (1, 2, 4, 1, 8, 16)])
def test_routed_attention_matches_masked_reference(B, h, S, t, d, k):
    q, kk, v = _qkv(B, h, S * S, t, d)
    idx = route_regions(q.transpose(1, 2).flatten(3), kk.transpose(1, 2).flatten(3), k)
    assert idx.shape == (B, S * S, k) and idx.dtype == torch.int64
    torch.testing.assert_close(routed_attention(q, kk, v, idx), _masked(q, kk, v, idx))
    torch.testing.assert_close(routed_attention(q, kk, v, idx, scale=0.7), _masked(q, kk, v, idx, scale=0.7))


def test_limits_full_and_window():
    B, h, S, t, d = 2, 2, 3, 4, 8
    q, k, v = _qkv(B, h, S * S, t, d, seed=1)
    all_idx = torch.arange(S * S).flip(0).expand(B, S * S, S * S)
    full = F.scaled_dot_product_attention(*(x.reshape(B, h, -1, d) for x in (q, k, v))).reshape(q.shape)
    torch.testing.assert_close(routed_attention(q, k, v, all_idx), full)
    self_idx = torch.arange(S * S).expand(B, S * S)[..., None]
    torch.testing.assert_close(routed_attention(q, k, v, self_idx), F.scaled_dot_product_attention(q, k, v))


def test_routing_is_detached_and_attention_differentiable():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 4, 4, 4, seed=2))
    idx = route_regions(q.transpose(1, 2).flatten(3), k.transpose(1, 2).flatten(3), 2)
    assert not idx.requires_grad
    assert torch.autograd.gradcheck(lambda a, b, c: routed_attention(a, b, c, idx), (q, k, v))


@pytest.mark.parametrize("B,h,S,r,d,k", [(2, 2, 4, 4, 8, 3), (1, 3, 3, 3, 8, 2), (1, 1, 2, 7, 16, 2)])
def test_flex_matches_reference(B, h, S, r, d, k):
    q, kk, v = _qkv(B, h, S * S, r * r, d, seed=3)
    idx = route_regions(q.transpose(1, 2).flatten(3), kk.transpose(1, 2).flatten(3), k)
    torch.testing.assert_close(routed_attention_flex(q, kk, v, idx), routed_attention(q, kk, v, idx))


def test_module_k_all_equals_full_attention_module():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64)
    a = BiLevelRoutingAttention(16, 2, n_win=4, topk=16, qk_scale='head').double()
    b = BiLevelRoutingAttention(16, 2, n_win=4, topk=-1, qk_scale='head').double()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_module_errors_and_auto_pad():
    m = BiLevelRoutingAttention(16, 2, n_win=4, topk=2)
    with pytest.raises(ValueError, match="pad to 12×8"): m(torch.randn(1, 10, 8, 16))
    with pytest.raises(ValueError, match=r"\(B, H, W, 16\)"): m(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="topk"): BiLevelRoutingAttention(16, 2, n_win=2, topk=5)
    p = BiLevelRoutingAttention(16, 2, n_win=4, topk=2, auto_pad=True)
    assert p(torch.randn(1, 10, 7, 16)).shape == (1, 10, 7, 16)


PARAMS = {'xw_biformer_tiny': 13_142_760, 'xw_biformer_small': 25_536_232, 'xw_biformer_base': 56_804_968}
PAPER_M = {'xw_biformer_tiny': 13.1, 'xw_biformer_small': 25.5, 'xw_biformer_base': 56.8}


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts_match_paper(name):
    with torch.device('meta'): m = timm.create_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert n == PARAMS[name] and round(n / 1e6, 1) == PAPER_M[name]


def test_tiny_forward_backward_features():
    m = timm.create_model('xw_biformer_tiny', n_win=2, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    fm = timm.create_model('xw_biformer_tiny', n_win=2, features_only=True, out_indices=(1, 3))
    feats = fm(x)
    assert [f.shape[1] for f in feats] == fm.feature_info.channels() == [128, 512]
    assert [32 // f.shape[-1] for f in feats] == fm.feature_info.reduction() == [8, 32]
    with pytest.raises(ValueError, match="multiples of 7"): timm.create_model('xw_biformer_tiny')(x)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"): m(torch.randn(1, 4, 32, 32))


def test_complexity_slope_four_thirds():
    import numpy as np
    Ns = np.array([2 ** i for i in range(8, 20)], dtype=float)
    best = [min(attention_macs(n, 64, 'bra', S=s) for s in range(1, 150)) for n in Ns]
    assert abs(np.polyfit(np.log(Ns), np.log(best), 1)[0] - 4 / 3) < 0.02


def test_match_task_and_equal_models():
    x, y, cue, tgt = long_range_match(16, seed=0)
    reg = to_regions(x.permute(0, 2, 3, 1), 4)[:, :, 0]            # (16, 16 regions, 13)
    ar = torch.arange(16)
    assert torch.equal(reg[ar, cue, :8], reg[ar, tgt, :8]) and (reg[ar, cue, 8] == 1).all()
    assert torch.equal(reg[ar, tgt, 9:].argmax(-1), y)
    assert len({count_params(match_net(k)) for k in (0, 2, 4, -1)} | {count_params(match_net(2, routing='random'))}) == 1
    nets = [match_net(k) for k in (0, 2, -1)]                                  # one qk scale and LCE input in every arm
    assert len({(b.attn.scale, b.attn.lepe_on) for n in nets for b in n.stages[0].blocks}) == 1
    torch.manual_seed(0)
    r = match_net(2, routing='random')
    with pytest.raises(ValueError, match="routing"): match_net(2, routing='learned')


def test_random_routing_control():
    from xwlearn.repro.biformer import random_routed_attention
    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 16, 4, 8)
    idx = torch.zeros(2, 16, 3, dtype=torch.long)
    torch.manual_seed(1); a = random_routed_attention(q, k, v, idx)
    torch.manual_seed(1); ridx = torch.rand(2, 16, 16).argsort(-1)[..., :3]
    assert all(len(set(row.tolist())) == 3 for row in ridx.reshape(-1, 3))      # k distinct regions per query region
    torch.testing.assert_close(a, routed_attention(q, k, v, ridx))


def test_registries():
    from xwlearn.core import get_reproduction, get_recipe
    from pathlib import Path
    assert get_reproduction('biformer').paper == 'biformer'
    r = get_recipe('biformer_imagenet_biformer_small')
    assert r.paper == 'biformer' and r.epochs == 300
    assert (Path(__file__).parents[1]/'datasets'/f'{r.dataset}.md').exists()


# --- official checkpoints: the committed manifest of the official state-dict layout (names and shapes of the official
# models/biformer.py biformer_tiny/small/base, written once from the official model definition, not from our mapping)
import json
from pathlib import Path
from xwlearn.models.biformer import convert_official_biformer, load_official_biformer

_MANIFEST = json.loads((Path(__file__).parent / 'fixtures' / 'biformer_official_keys.json').read_text())


@pytest.mark.parametrize("name", ['tiny', 'small', 'base'])
def test_official_layout_maps_onto_ours(name):
    off = _MANIFEST[f'biformer_{name}']
    conv = convert_official_biformer({k: torch.empty(0) for k in off})
    assert len(conv) == len(off)                                    # one-to-one
    with torch.device('meta'): ours = timm.create_model(f'xw_biformer_{name}').state_dict()
    assert set(conv) == set(ours)
    back = dict(zip(conv, off))                                     # dict order is kept: ours -> official name
    assert all(list(ours[k].shape) == off[back[k]] for k in ours)


def _official_random(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _MANIFEST[f'biformer_{name}'].items():
        if k.endswith('num_batches_tracked'): sd[k] = torch.tensor(0)
        elif k.endswith('running_var'): sd[k] = torch.rand(shape, generator=g) + 0.5
        else: sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


def test_official_checkpoint_loads_through_timm(tmp_path):
    sd = _official_random('tiny')
    path = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': sd}, path)
    direct = timm.create_model('xw_biformer_tiny', n_win=2).eval()
    direct.load_state_dict(convert_official_biformer(sd), strict=True)
    via_timm = timm.create_model('xw_biformer_tiny', n_win=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    via_loader = load_official_biformer(path, n_win=2).eval()        # variant read from the shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): ref = direct(x)
    for m in (via_timm, via_loader):
        with torch.no_grad(): assert torch.equal(m(x), ref)
    assert torch.equal(direct.stages[3].blocks[0].attn.wo.weight, sd['stages.3.0.attn.proj.weight'])
    assert torch.equal(direct.stages[1].blocks[1].mlp[2].bias, sd['stages.1.1.mlp.3.bias'])


def test_full_attention_lepe_reads_block_input():
    # official AttentionLePE: LCE on the attention input x; the paper's equation (and the BRA stages): LCE on V
    torch.manual_seed(0)
    with torch.device('meta'):
        m = timm.create_model('xw_biformer_tiny', n_win=2)
        assert timm.create_model('xw_biformer_tiny', n_win=2, full_lepe_on='v').stages[3].blocks[0].attn.lepe_on == 'v'
    assert [b.attn.lepe_on for s in m.stages for b in s.blocks[:1]] == ['v', 'v', 'v', 'x']
    x = torch.randn(1, 4, 4, 16, dtype=torch.float64)
    for on in ('x', 'v'):
        a = BiLevelRoutingAttention(16, 2, topk=-1, lepe_on=on).double()
        with torch.no_grad():
            a.qkv.weight.zero_(); a.qkv.bias.zero_(); a.qkv.bias[32:] = 1.    # q = k = 0, v = 1: attention output 1
            a.wo.weight.copy_(torch.eye(16)); a.wo.bias.zero_()
        src = x if on == 'x' else torch.ones_like(x)
        lce = a.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(a(x), 1 + lce)
    with pytest.raises(ValueError, match="lepe_on"): BiLevelRoutingAttention(16, 2, lepe_on='q')
