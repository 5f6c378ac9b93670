"""DDQ (xwlearn.detection.ddq): distinct-query selection, top-k Hungarian targets, pyramid shuffle, the DDQ-FCN
detector's modes, DDQ-DETR's re-selection bookkeeping and attention mask — each against a naive version."""
import math
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torchvision.ops import box_convert, box_iou

from xwlearn.detection.ddq import (distinct_queries, ddq_cost, ddq_targets, ddq_set_loss, pyramid_shuffle, DDQFCNHead,
                                   DDQFCN, DDQRCNN, DDQ_FCN_MODES, topk_per_level, select_proposals, reselect_distinct,
                                   distinct_attn_mask, ddq_decode, ddq_head, ddq_detr_loss, DDQDETR)
from xwlearn.vision.layers import TinyBackbone, BackboneFPN

torch.set_num_threads(1)


def _boxes(g, n, size=64.):
    c, wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size, torch.rand(n, 2, generator=g, dtype=torch.float64) * 20 + 2
    return torch.cat([c - wh / 2, c + wh / 2], 1)


def _naive_nms(b, s, thr):
    order, keep = s.argsort(descending=True).tolist(), []
    while order:
        i = order.pop(0); keep.append(i)
        order = [j for j in order if box_iou(b[i:i + 1], b[j:j + 1]).item() <= thr]
    return keep


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), thr=st.sampled_from([0.3, 0.5, 0.7, 0.8]))
def test_distinct_queries_is_greedy_nms(seed, n, thr):
    g = torch.Generator().manual_seed(seed)
    b, s = _boxes(g, n), torch.rand(n, 4, generator=g, dtype=torch.float64)
    keep = distinct_queries(b, s, thr)
    assert keep.tolist() == _naive_nms(b, s.max(1).values, thr)
    iou = box_iou(b[keep], b[keep]).fill_diagonal_(0)
    assert (iou <= thr + 1e-9).all()                     # distinct: no pair above the threshold


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.integers(1, 16), thr=st.sampled_from([0.5, 0.8]))
def test_reselect_matches_a_loop_and_never_revives(seed, q, thr):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, q, 4, generator=g) * 0.3 + 0.3
    boxes = base + torch.rand(2, q, 4, generator=g) * 0.02 * (torch.rand(2, q, 1, generator=g) > 0.5)
    scores = torch.rand(2, q, 3, generator=g)
    alive = torch.rand(2, q, generator=g) > 0.3
    new = reselect_distinct(boxes, scores, alive, thr)
    assert not (new & ~alive).any()
    for b in range(2):
        idx = alive[b].nonzero()[:, 0].tolist()
        ref = torch.zeros(q, dtype=torch.bool)
        if idx:
            xy = box_convert(boxes[b, idx], 'cxcywh', 'xyxy').double()
            ref[[idx[k] for k in _naive_nms(xy, scores[b, idx].max(1).values.double(), thr)]] = True
        assert torch.equal(new[b], ref)


def test_reselect_query_zero_kept_and_removed():
    b = torch.tensor([[[.3, .3, .2, .2], [.301, .3, .2, .2], [.7, .7, .1, .1]]])
    kept0 = reselect_distinct(b, torch.tensor([[.9, .5, .4]]), torch.ones(1, 3, dtype=torch.bool))
    assert kept0[0].tolist() == [True, False, True]
    gone0 = reselect_distinct(b, torch.tensor([[.5, .9, .4]]), torch.ones(1, 3, dtype=torch.bool))
    assert gone0[0].tolist() == [False, True, True]
    with pytest.raises(ValueError, match='alive: expected shape'): reselect_distinct(b, b[..., 0], torch.ones(1, 2, dtype=torch.bool))


def test_attn_mask_against_a_loop():
    g = torch.Generator().manual_seed(0)
    alive = torch.rand(3, 7, generator=g) > 0.4
    dn = torch.rand(4 + 7, 4 + 7, generator=g) > 0.7
    grp = lambda k: 0 if k < 11 else 1
    for mode in ('cut', 'official'):
        m = distinct_attn_mask(alive, n_heads=2, n_dense=3, dn_mask=dn, mode=mode)
        assert m.shape == (6, 14, 14)
        for b in range(3):
            want = torch.zeros(14, 14, dtype=torch.bool)
            for i in range(14):
                for j in range(14):
                    w = bool(dn[i, j]) if i < 11 and j < 11 else grp(i) != grp(j)
                    di, dj = 4 <= i < 11 and not alive[b, i - 4], 4 <= j < 11 and not alive[b, j - 4]
                    want[i, j] = ((w or di or dj) and i != j) if mode == 'cut' else (w or (di and dj))  # official: removed x removed
            for i in range(14):
                if want[i].all(): want[i, i] = False                    # an all-blocked row would give NaN: its diagonal opens
            assert torch.equal(m[2 * b], want) and torch.equal(m[2 * b + 1], want), (mode, b)
    with pytest.raises(ValueError, match='dn_mask: expected'): distinct_attn_mask(alive, 1, dn_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match='mode: expected'): distinct_attn_mask(alive, 1, mode='rows')


def test_select_proposals_fills_with_dead_slots():
    lg = torch.tensor([[2.], [1.9], [1.], [0.]])
    bx = torch.tensor([[.5, .5, .2, .2], [.5, .5, .2, .2], [.2, .2, .1, .1], [.8, .8, .1, .1]])
    keep, alive, dense = select_proposals(lg, bx, n_distinct=4, n_dense=2)
    assert keep.tolist() == [0, 2, 3, 1] and alive.tolist() == [True, True, True, False] and dense.tolist() == [0, 1]


def test_targets_one_to_one_and_top_k():
    g = torch.Generator().manual_seed(1)
    b, p = _boxes(g, 20), torch.rand(20, 3, generator=g, dtype=torch.float64)
    gb, gl = _boxes(g, 4), torch.tensor([0, 1, 2, 0])
    pi, gi, q = ddq_targets(p, b, gb, gl, (64, 64), k=1)
    assert sorted(gi.tolist()) == [0, 1, 2, 3] and len(set(pi.tolist())) == 4
    pi, gi, q = ddq_targets(p, b, gb, gl, (64, 64), k=4)
    assert torch.bincount(gi).tolist() == [4, 4, 4, 4] and len(set(pi.tolist())) == 16
    assert ((q >= 0) & (q <= 1)).all()
    # the matching minimises the total cost: no swap of two matched predictions lowers it
    c = ddq_cost(p, b, gb, gl, (64, 64))
    pi, gi, _ = ddq_targets(p, b, gb, gl, (64, 64), k=1)
    total = c[pi, gi].sum()
    for a in range(4):
        for z in range(a + 1, 4):
            sw = gi.clone(); sw[[a, z]] = sw[[z, a]]
            assert c[pi, sw].sum() >= total - 1e-9
    e = ddq_targets(p, b, gb[:0], gl[:0], (64, 64))
    assert all(len(x) == 0 for x in e)


def test_set_loss_gradients_and_no_objects():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(10, 3, generator=g, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    b = _boxes(g, 10).requires_grad_()
    gb, gl = _boxes(g, 2), torch.tensor([1, 2])
    cls, box, n = ddq_set_loss(p, b, gb, gl, (64, 64), k=2)
    (cls + box).backward()
    assert n > 0 and torch.isfinite(p.grad).all() and b.grad.abs().sum() > 0
    cls, box, n = ddq_set_loss(p, b, gb[:0], gl[:0], (64, 64))
    assert n == 0 and box.item() == 0 and cls.item() > 0     # all background: the classifier is still trained


def test_pyramid_shuffle_naive():
    g = torch.Generator().manual_seed(3)
    fs = [torch.randn(1, 12, s, s, generator=g, dtype=torch.float64) for s in (8, 4, 2, 1)]
    out = pyramid_shuffle(fs, 3)
    rs = lambda x, s: F.interpolate(x, size=(s, s), mode='bilinear', align_corners=True)
    for l, f in enumerate(fs):
        up, dn = fs[min(l + 1, 3)], fs[max(l - 1, 0)]
        s = f.shape[-1]
        torch.testing.assert_close(out[l], torch.cat([f[:, :6], rs(up[:, 9:], s), rs(dn[:, 6:9], s)], 1))


def test_topk_per_level():
    s = torch.tensor([5., 1, 3, 9, 2, 0, 7])
    assert topk_per_level(s, [3, 4], 2).tolist() == [0, 2, 3, 6]
    with pytest.raises(ValueError, match='counts: expected'): topk_per_level(s, [3, 3], 2)


def _tiny(mode='ddq', **kw):
    torch.manual_seed(0)
    return DDQFCN(BackboneFPN(TinyBackbone(widths=(8, 16, 16, 16, 16)), out_channels=16), 3, mode=mode, n_convs=2, nms_pre=50, num_queries=20, **kw)


@pytest.mark.parametrize('mode', DDQ_FCN_MODES)
def test_ddq_fcn_modes(mode):
    m = _tiny(mode)
    ims = [torch.randint(0, 255, (3, 48, 40), dtype=torch.uint8), torch.rand(3, 32, 64)]
    tg = [dict(boxes=torch.tensor([[4., 4., 20., 30.], [10., 10., 30., 30.]]), labels=torch.tensor([1, 3])),
          dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    l = m(ims, tg)
    assert set(l) == ({'cls', 'box', 'aux_cls', 'aux_box'} if mode == 'ddq' else {'cls', 'box'})
    sum(l.values()).backward()
    assert all(torch.isfinite(v) for v in l.values())
    m.eval()
    with torch.no_grad(): d = m(ims)
    for det, (h, w) in zip(d, [(48, 40), (32, 64)]):
        assert len(det['boxes']) <= 20 and set(det) == {'boxes', 'scores', 'labels'}
        assert ((det['labels'] >= 1) & (det['labels'] <= 3)).all()
        assert (det['boxes'][:, 2] <= w).all() and (det['boxes'][:, 3] <= h).all()
    if mode == 'ddq':   # NMS-free output: the returned boxes come from distinct queries (pairwise IoU ≤ 0.7 or the same query)
        b = d[0]['boxes']; iou = box_iou(b, b).nan_to_num(0.)   # clamped to the image, a box can have zero area
        assert ((iou <= 0.7 + 1e-6) | (iou > 1 - 1e-6)).all()


def test_batch_images_and_errors():
    m = _tiny()
    x, sizes = m.batch_images([torch.zeros(3, 40, 50, dtype=torch.uint8), torch.ones(3, 70, 20)])
    assert x.shape == (2, 3, 96, 64) and sizes == [(40, 50), (70, 20)]      # padded to the largest stride (32)
    with pytest.raises(TypeError, match='images: expected'): m.batch_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match='mode: expected'): _tiny('fcos')
    with pytest.raises(TypeError, match='rpn: expected'): DDQRCNN(_tiny('one2many_nms'))
    with pytest.raises(ValueError, match='feats: expected'): m.head([torch.zeros(1, 16, 4, 4)])


def test_official_ddq_fcn_manifest_converts_and_loads():
    "Every key of the official DDQ-FCN R50 (manifest dumped from the official model definition) has a slot of its shape (P6 from C5: `p6p7='c5'`)."
    import json
    from pathlib import Path
    from xwlearn.detection.ddq import convert_official_ddq_fcn
    from xwlearn.vision.layers import TimmFeatures
    man = json.loads((Path(__file__).parent/'fixtures'/'ddq_fcn_r50_keys.json').read_text())['keys']
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith('num_batches_tracked') else torch.randn(s, generator=g)) for k, s in man.items()}
    conv = convert_official_ddq_fcn({'meta': {}, 'state_dict': sd})
    assert len(conv) == len(man)
    m = DDQFCN(BackboneFPN(TimmFeatures('resnet50', out_indices=(2, 3, 4)), 256, p6p7='c5'), 80)
    m.load_state_dict(conv, strict=True)
    assert m.fpn.fpn.extra_blocks.p6.in_channels == 2048 and not m.fpn.fpn.extra_blocks.relu
    own = m.state_dict()
    for k, v in conv.items(): assert torch.equal(own[k], v.to(own[k].dtype)), k
    with pytest.raises(KeyError, match='unexpected key'): convert_official_ddq_fcn({'rpn_head.conv_cls.weight': torch.zeros(1)})
    with pytest.raises(TypeError, match='state_dict must be a dict'): convert_official_ddq_fcn([1])


# ---------------------------------------------------------------- DDQ-DETR in the official layout

def official_ddq_detr_layout(in_channels=(512, 1024, 2048), n_levels=4, d=256, heads=8, points=4, ffn=2048, n_enc=6, n_dec=6, K=80):
    """Non-backbone keys -> shapes of jshilong/DDQ@ddq_detr `DDQDETR`, written from the code (projects/models/ddq_detr.py, vendored
    mmdet 3 / mmcv 2.0.0rc4): ChannelMapper (ConvModule conv + gn, no bias with a norm), DeformableDetrTransformerEncoder/DecoderLayer
    (mmcv MultiScaleDeformableAttention; MultiheadAttention wraps nn.MultiheadAttention as `.attn`; FFN `layers.0.0`/`layers.1`;
    `norms.i`), DDQTransformerDecoder (`ref_point_head` = MLP(2d, d, d, 2) `layers.0/1`, `norm`), DINO (`level_embed`,
    `memory_trans_fc/norm`, CdnQueryGenerator `label_embedding`; DDQ sets `query_embedding` None, adds `query_map`), DDQDETRHead
    (n_dec + 1 cls/reg branches from DINOHead + 1 for the dense encoder proposals; n_dec aux branches). `decoder.aux_reg_branches`
    aliases `bbox_head.aux_reg_branches` (assigned as a module attribute in the training forward, so saved in trained checkpoints)."""
    k = {}
    def lin(p, o, i): k[p + '.weight'] = [o, i]; k[p + '.bias'] = [o]
    def ln(p): k[p + '.weight'] = [d]; k[p + '.bias'] = [d]
    def msda(p):
        lin(p + '.sampling_offsets', heads * n_levels * points * 2, d); lin(p + '.attention_weights', heads * n_levels * points, d)
        lin(p + '.value_proj', d, d); lin(p + '.output_proj', d, d)
    def mlp3(p): lin(p + '.0', d, d); lin(p + '.2', d, d); lin(p + '.4', 4, d)
    for i, c in enumerate(in_channels):
        k[f'neck.convs.{i}.conv.weight'] = [d, c, 1, 1]; k[f'neck.convs.{i}.gn.weight'] = [d]; k[f'neck.convs.{i}.gn.bias'] = [d]
    for j in range(n_levels - len(in_channels)):
        k[f'neck.extra_convs.{j}.conv.weight'] = [d, in_channels[-1] if j == 0 else d, 3, 3]
        k[f'neck.extra_convs.{j}.gn.weight'] = [d]; k[f'neck.extra_convs.{j}.gn.bias'] = [d]
    for i in range(n_enc):
        p = f'encoder.layers.{i}'
        msda(p + '.self_attn'); lin(p + '.ffn.layers.0.0', ffn, d); lin(p + '.ffn.layers.1', d, ffn); ln(p + '.norms.0'); ln(p + '.norms.1')
    for i in range(n_dec):
        p = f'decoder.layers.{i}'
        k[p + '.self_attn.attn.in_proj_weight'] = [3 * d, d]; k[p + '.self_attn.attn.in_proj_bias'] = [3 * d]; lin(p + '.self_attn.attn.out_proj', d, d)
        msda(p + '.cross_attn'); lin(p + '.ffn.layers.0.0', ffn, d); lin(p + '.ffn.layers.1', d, ffn)
        for n in range(3): ln(p + f'.norms.{n}')
    lin('decoder.ref_point_head.layers.0', d, 2 * d); lin('decoder.ref_point_head.layers.1', d, d); ln('decoder.norm')
    k['level_embed'] = [n_levels, d]
    lin('memory_trans_fc', d, d); ln('memory_trans_norm'); lin('query_map', d, d)
    k['dn_query_generator.label_embedding.weight'] = [K, d]
    for i in range(n_dec + 2): lin(f'bbox_head.cls_branches.{i}', K, d); mlp3(f'bbox_head.reg_branches.{i}')
    for i in range(n_dec): lin(f'bbox_head.aux_cls_branches.{i}', K, d); mlp3(f'bbox_head.aux_reg_branches.{i}')
    for i in range(n_dec): mlp3(f'decoder.aux_reg_branches.{i}')
    return k


@pytest.mark.parametrize('n', [4, 5])
def test_official_ddq_detr_manifest_converts_and_loads_strictly(n):
    "The committed manifest (written from the official code) = the layout above at R50 size; every key converts to a slot of its shape (strict)."
    import json
    from pathlib import Path
    from xwlearn.detection.ddq import DDQDETR, convert_official_ddq_detr
    from xwlearn.vision.layers import TimmFeatures
    man = json.loads((Path(__file__).parent/'fixtures'/f'ddq_detr_r50_{n}scale_keys.json').read_text())['keys']
    fcn = json.loads((Path(__file__).parent/'fixtures'/'ddq_fcn_r50_keys.json').read_text())['keys']
    inc = (512, 1024, 2048) if n == 4 else (256, 512, 1024, 2048)
    assert {k: v for k, v in man.items() if not k.startswith('backbone.')} == official_ddq_detr_layout(inc, n)
    assert {k: v for k, v in man.items() if k.startswith('backbone.')} == {k: v for k, v in fcn.items() if k.startswith('backbone.')}
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(man.items())}        # a distinct value per tensor: swaps show
    for k in sd:
        if k.startswith('decoder.aux_reg_branches.'): sd[k] = sd['bbox_head.' + k[len('decoder.'):]]
    conv = convert_official_ddq_detr({'meta': {}, 'state_dict': sd})
    assert len(conv) == len(man) - sum(k.startswith('decoder.aux_reg_branches.') for k in man)
    with torch.device('meta'):
        m = DDQDETR(TimmFeatures('resnet50', out_indices=(2, 3, 4) if n == 4 else (1, 2, 3, 4)), 80, n_levels=n)
    m.load_state_dict(conv, strict=True, assign=True)
    own = m.state_dict()
    for k, v in conv.items(): assert own[k] is v or torch.equal(own[k], v), k
    bad = dict(sd); bad['decoder.aux_reg_branches.0.0.weight'] = bad['decoder.aux_reg_branches.0.0.weight'] + 1
    with pytest.raises(ValueError, match='should alias'): convert_official_ddq_detr(bad)
    with pytest.raises(KeyError, match='unexpected key'): convert_official_ddq_detr({'bbox_head.foo.weight': torch.zeros(1)})


from mmdet_detr_ref import lin as _lin, ln as _ln, sine as _official_sine, msda as _msda, mha as _mha   # the official arithmetic, shared with test_vision_dino_detr.py


def _official_eval(sd, feats, img_hw, batch_hw, cfg):
    "DDQ-DETR's test forward from official-layout tensors, float64, following DDQDETR.pre_decoder / DDQTransformerDecoder.forward / be_distinct / DDQDETRHead.forward."
    from torchvision.ops import batched_nms
    d, heads, L, P, n_dec, topk, thr, groups = (cfg[k] for k in ('d', 'heads', 'L', 'P', 'n_dec', 'topk', 'thr', 'groups'))
    gn = lambda x, p: F.group_norm(x, groups, sd[p + '.weight'], sd[p + '.bias'])
    outs = [gn(F.conv2d(f, sd[f'neck.convs.{i}.conv.weight']), f'neck.convs.{i}.gn') for i, f in enumerate(feats)]
    outs.append(gn(F.conv2d(feats[-1], sd['neck.extra_convs.0.conv.weight'], stride=2, padding=1), 'neck.extra_convs.0.gn'))
    B = len(img_hw)
    masks = torch.ones(B, *batch_hw, dtype=torch.float64)
    for i, (h, w) in enumerate(img_hw): masks[i, :h, :w] = 0
    mlvl = [F.interpolate(masks[None], size=o.shape[-2:]).to(torch.bool).squeeze(0) for o in outs]
    src, pos, kpm, shapes, vr = [], [], [], [], []
    for l, (o, m) in enumerate(zip(outs, mlvl)):                       # SinePositionalEncoding(128, normalize, offset 0, temperature 20)
        nm = (~m).to(torch.float64)
        y, x = nm.cumsum(1), nm.cumsum(2)
        y, x = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi, x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        pe = torch.cat([_official_sine(y, d // 2, 20), _official_sine(x, d // 2, 20)], -1)      # (B, H, W, d): [y | x]
        src.append(o.flatten(2).transpose(1, 2)); pos.append(pe.flatten(1, 2) + sd['level_embed'][l]); kpm.append(m.flatten(1))
        shapes.append(o.shape[-2:])
        vr.append(torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1).to(torch.float64))
    src, pos, kpm, shapes, vr = torch.cat(src, 1), torch.cat(pos, 1), torch.cat(kpm, 1), torch.tensor(shapes), torch.stack(vr, 1)
    refs = []                                                          # get_encoder_reference_points
    for l, (H, W) in enumerate(shapes.tolist()):
        ry, rx = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=torch.float64), torch.linspace(0.5, W - 0.5, W, dtype=torch.float64), indexing='ij')
        refs.append(torch.stack((rx.reshape(-1)[None] / (vr[:, None, l, 0] * W), ry.reshape(-1)[None] / (vr[:, None, l, 1] * H)), -1))
    eref = torch.cat(refs, 1)[:, :, None] * vr[:, None]
    q = src
    for i in range(cfg['n_enc']):
        p = f'encoder.layers.{i}'
        q = _ln(sd, p + '.norms.0', q + _msda(sd, p + '.self_attn', q + pos, q, eref, shapes, kpm, heads, L, P))
        q = _ln(sd, p + '.norms.1', q + _lin(sd, p + '.ffn.layers.1', F.relu(_lin(sd, p + '.ffn.layers.0.0', q))))
    memory, props, start = q, [], 0                                    # gen_encoder_output_proposals
    for l, (H, W) in enumerate(shapes.tolist()):
        mf = kpm[:, start:start + H * W].view(B, H, W, 1)
        vH, vW = (~mf[:, :, 0, 0]).sum(1)[:, None], (~mf[:, 0, :, 0]).sum(1)[:, None]
        gy, gx = torch.meshgrid(torch.linspace(0, H - 1, H, dtype=torch.float64), torch.linspace(0, W - 1, W, dtype=torch.float64), indexing='ij')
        grid = (torch.cat([gx[..., None], gy[..., None]], -1)[None].expand(B, -1, -1, -1) + 0.5) / torch.cat([vW, vH], 1).view(B, 1, 1, 2)
        props.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * 2.0 ** l), -1).view(B, -1, 4)); start += H * W
    op = torch.cat(props, 1)
    okp = ((op > 0.01) & (op < 0.99)).all(-1, keepdim=True)
    op = torch.log(op / (1 - op)).masked_fill(kpm[..., None], float('inf')).masked_fill(~okp, float('inf'))
    om = memory.masked_fill(kpm[..., None], 0.).masked_fill(~okp, 0.)
    om = _ln(sd, 'memory_trans_norm', _lin(sd, 'memory_trans_fc', om))
    cls_b = lambda i, x: _lin(sd, f'bbox_head.cls_branches.{i}', x)
    reg_b = lambda i, x: _lin(sd, f'bbox_head.reg_branches.{i}.4', F.relu(_lin(sd, f'bbox_head.reg_branches.{i}.2', F.relu(_lin(sd, f'bbox_head.reg_branches.{i}.0', x)))))
    e_cls, e_un = cls_b(n_dec, om), reg_b(n_dec, om) + op
    xyxy = lambda b: torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
    sc, pr, qmap = e_cls.max(-1)[0].sigmoid(), xyxy(e_un.sigmoid()), _lin(sd, 'query_map', memory)
    query, unact = [], []
    for b in range(B):
        keep = batched_nms(pr[b].float(), sc[b].float(), torch.ones(len(sc[b])), thr)
        assert len(keep) >= topk                                       # (the official pads with zeros otherwise)
        query.append(qmap[b][keep][:topk]); unact.append(e_un[b][keep][:topk])
    query, ref = torch.stack(query), torch.stack(unact).sigmoid()
    attn_mask = torch.zeros(B * heads, topk, topk, dtype=torch.bool)
    inter, inter_refs, dq_masks = [], [ref], []
    for lid in range(n_dec):                                           # DDQTransformerDecoder.forward (eval branch)
        rin = ref[:, :, None] * torch.cat([vr, vr], -1)[:, None]
        emb = rin[:, :, 0] * 2 * math.pi
        sine = torch.cat([_official_sine(emb[..., i], d // 2, 10000) for i in (1, 0, 2, 3)], -1)     # coordinate_to_encoding
        qpos = _lin(sd, 'decoder.ref_point_head.layers.1', F.relu(_lin(sd, 'decoder.ref_point_head.layers.0', sine)))
        p = f'decoder.layers.{lid}'
        query = _ln(sd, p + '.norms.0', query + _mha(sd, p + '.self_attn.attn', query, qpos, attn_mask, heads))
        query = _ln(sd, p + '.norms.1', query + _msda(sd, p + '.cross_attn', query + qpos, memory, rin, shapes, kpm, heads, L, P))
        query = _ln(sd, p + '.norms.2', query + _lin(sd, p + '.ffn.layers.1', F.relu(_lin(sd, p + '.ffn.layers.0.0', query))))
        x = ref.clamp(0, 1)
        new = (reg_b(lid, query) + torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3))).sigmoid()
        ref = new.detach()
        if lid < n_dec - 1:                                            # be_distinct
            s = cls_b(lid, query).sigmoid().max(-1).values
            masks_ = []
            for b in range(B):
                ori = (~attn_mask[b * heads][0]).nonzero().view(-1)
                keep = batched_nms(xyxy(ref[b])[ori].float(), s[b][ori].float(), torch.ones(len(ori)), thr)
                m = torch.ones(topk, topk, dtype=torch.bool); m[ori[keep]] = False; m[:, ori[keep]] = False
                masks_.append(m[None].repeat(heads, 1, 1))
            attn_mask = torch.cat(masks_); dq_masks.append(~attn_mask)
        inter.append(_ln(sd, 'decoder.norm', query)); inter_refs.append(new)
    logits, boxes = [], []                                             # DDQDETRHead.forward (eval: no dense queries)
    for l in range(n_dec):
        x = inter_refs[l].clamp(0, 1)
        logits.append(cls_b(l, inter[l])); boxes.append((reg_b(l, inter[l]) + torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))).sigmoid())
    return torch.stack(logits), torch.stack(boxes), dq_masks


class _Fixed(torch.nn.Module):
    "A backbone stub: returns fixed maps (the official test forward starts at the neck)."
    def __init__(self, feats): super().__init__(); self.feats, self.channels = feats, [f.shape[1] for f in feats]
    def forward(self, x): return self.feats


def test_converted_ddq_detr_equals_the_official_forward_float64():
    "Random official-layout tensors (tiny DDQ-DETR) → converter → strict load; our eval forward equals the official computation, layer by layer, in float64."
    from xwlearn.detection.ddq import DDQDETR, convert_official_ddq_detr
    cfg = dict(d=16, heads=2, L=4, P=2, n_enc=1, n_dec=2, topk=12, thr=0.5, groups=4)
    g = torch.Generator().manual_seed(0)
    lay = official_ddq_detr_layout((6, 8, 10), 4, 16, 2, 2, 24, 1, 2, 3)
    sd = {}
    for k, s in lay.items():
        sd[k] = torch.randn(s, generator=g, dtype=torch.float64) * (0.1 if len(s) == 1 else 1 / math.sqrt(math.prod(s[1:])))
        if k.endswith(('norms.0.weight', 'norms.1.weight', 'norms.2.weight', 'norm.weight', 'gn.weight')): sd[k] = sd[k] + 1
    sd['bbox_head.reg_branches.0.4.bias'][2:] += 3.                  # layer 0 grows its boxes: the re-selection after it has work
    for k in sd:
        if k.startswith('decoder.aux_reg_branches.'): sd[k] = sd['bbox_head.' + k[len('decoder.'):]]
    feats = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in ((6, 16), (8, 8), (10, 4))]
    m = DDQDETR(_Fixed(feats), 3, d_model=16, n_heads=2, n_levels=4, n_points=2, n_enc=1, n_dec=2, d_ffn=24, n_queries=12, iou_thr=0.5, gn_groups=4)
    m = m.double().eval()                                              # float64 before loading: no float32 rounding of the weights
    m.load_state_dict(convert_official_ddq_detr(sd), strict=True)
    images = [torch.rand(3, 64, 64, dtype=torch.float64), torch.rand(3, 48, 56, dtype=torch.float64)]
    x, mask, sizes = m.batch_images(images)
    with torch.no_grad(): out = m.forward_outputs(x, mask)
    lg, bx, dq = _official_eval(sd, feats, sizes, tuple(x.shape[-2:]), cfg)
    torch.testing.assert_close(out['logits'], lg, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out['boxes'], bx, rtol=1e-9, atol=1e-9)
    kept = torch.stack([dq[0][b * 2].all(1) for b in range(2)])        # official: a kept query's row of ~mask is all True
    assert torch.equal(out['alive'][1], kept) and kept.any(1).all() and not kept.all(1).any()   # it removed some queries, not all


def test_ddq_detr_losses_read_only_their_queries():
    "From the gradients: the one-to-one loss reads exactly the alive distinct queries, the dn loss the dn slots, the aux loss the dense ones."
    from xwlearn.vision.detr import dn_queries
    tg = [dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .2]], dtype=torch.float64)),
          dict(labels=torch.tensor([1]), boxes=torch.tensor([[.5, .5, .4, .4]], dtype=torch.float64))]
    Q, D = 5, 6
    dn = dn_queries(tg, 3, Q, n_groups=2, generator=torch.Generator().manual_seed(0))
    N = dn['labels'].shape[1]
    g = torch.Generator().manual_seed(1)
    lg = torch.randn(2, N + Q + D, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bx = (torch.rand(2, N + Q + D, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3).requires_grad_()
    alive = torch.tensor([[True, True, False, True, True], [False, False, True, True, False]])
    ls = ddq_detr_loss(lg, bx, alive, tg, [(64, 64), (48, 64)], N, D, dn, aux_k=2)
    assert set(ls) == {'main', 'dn', 'aux'} and all(torch.isfinite(v) and v > 0 for v in ls.values())
    for part, sl in (('aux', slice(N + Q, None)), ('dn', slice(0, N)), ('main', slice(N, N + Q))):
        gl, gb = torch.autograd.grad(ls[part], (lg, bx), retain_graph=True)
        touched = (gl.abs().sum(-1) + gb.abs().sum(-1)) > 0
        inside = torch.zeros_like(touched); inside[:, sl] = True
        if part == 'main': inside[:, N:N + Q] = alive
        assert torch.equal(touched, inside), part
    # the aux loss is DDQ's one-to-many loss (top-k Hungarian, QFL + GIoU in pixels) on the dense slice alone
    cls, box, norm = [], [], []
    for b, (h, w) in enumerate([(64, 64), (48, 64)]):
        s = torch.tensor([w, h, w, h], dtype=torch.float64)
        c, bb, q = ddq_set_loss(lg[b, N + Q:].sigmoid(), box_convert(bx[b, N + Q:], 'cxcywh', 'xyxy') * s,
                                box_convert(tg[b]['boxes'], 'cxcywh', 'xyxy') * s, tg[b]['labels'], (w, h), 2)
        cls.append(c); box.append(bb); norm.append(q)
    torch.testing.assert_close(ls['aux'], (sum(cls) + sum(box)) / sum(norm).clamp(min=1))
    with pytest.raises(ValueError, match='alive: expected'): ddq_detr_loss(lg, bx, alive[:, :2], tg, [(64, 64)] * 2, N, D, dn)


def _tiny_decoder(d=16, n_layers=3):
    from torch import nn
    from xwlearn.vision.detr import DeformableDecoderLayer, mlp
    torch.manual_seed(0)
    dec = nn.ModuleDict(dict(layers=nn.ModuleList([DeformableDecoderLayer(d, 2, 2, 2, 32) for _ in range(n_layers)]),
                             ref_point_head=mlp(2 * d, d, d, 2), norm=nn.LayerNorm(d)))
    return dec, *(nn.ModuleList([mlp(d, d, 4) for _ in range(n_layers)]) for _ in range(2)), nn.ModuleList([nn.Linear(d, 3) for _ in range(n_layers)])


def test_ddq_decode_isolation_and_gradients():
    "Dense queries and dn queries cannot change the matching queries' outputs; boxes of layer l carry the gradient of branch l − 1 (look forward twice)."
    from xwlearn.vision.detr import dn_queries
    dec, regs, auxr, clss = _tiny_decoder()
    B, Q, D, d = 2, 6, 4, 16
    dn = dn_queries([dict(labels=torch.tensor([1]), boxes=torch.tensor([[.5, .5, .2, .2]]))] * B, 3, Q, n_groups=2)
    N = dn['labels'].shape[1]
    ref = torch.cat([dn['boxes'], torch.rand(B, Q + D, 4) * 0.4 + 0.3], 1)
    mem, shapes = torch.randn(B, 20, d), torch.tensor([[4, 4], [2, 2]])
    alive = torch.tensor([[True] * 6, [True, True, False, True, True, True]])
    run = lambda t, mode='official': ddq_decode(dec, regs, clss, t, ref, mem, shapes, alive, D, dn['attn_mask'], auxr, 0.8, mask_mode=mode)
    tgt = torch.randn(B, N + Q + D, d)
    for mode in ('official', 'cut'):
        base = run(tgt, mode)['hs']
        t = tgt.clone(); t[:, N + Q:] += 1
        torch.testing.assert_close(run(t, mode)['hs'][:, :, :N + Q], base[:, :, :N + Q])
        t = tgt.clone(); t[:, :N] += 1
        torch.testing.assert_close(run(t, mode)['hs'][:, :, N:], base[:, :, N:])
    # 'cut': a removed query cannot change the others; 'official': it can (kept queries still read it)
    dead = N + 2
    t = tgt.clone(); t[1, dead] += 1
    keep = [i for i in range(N, N + Q) if i != dead]
    torch.testing.assert_close(run(t, 'cut')['hs'][0, 1, keep], run(tgt, 'cut')['hs'][0, 1, keep])
    assert not torch.allclose(run(t, 'official')['hs'][0, 1, keep], run(tgt, 'official')['hs'][0, 1, keep])
    out = run(tgt)
    lg, bx = ddq_head(out['hs'], out['references'], clss, regs, clss, auxr, D)
    gr = torch.autograd.grad(bx[1].sum(), [*regs[0].parameters(), *regs[1].parameters(), *regs[2].parameters()], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in gr[:12]) and all(g is None or not g.any() for g in gr[12:])


def test_ddq_detr_forward_backward_and_inference():
    from xwlearn.vision.scenes import make_scenes
    sc = make_scenes(4, size=64, seed=0, max_objects=5, crowding=0.5)
    ims = [torch.from_numpy(sc.images[i]).permute(2, 0, 1) for i in range(2)]
    tgs = [dict(boxes=torch.as_tensor(sc.target(i)['boxes'], dtype=torch.float32), labels=torch.as_tensor(sc.target(i)['labels'])) for i in range(2)]
    torch.manual_seed(0)
    m = DDQDETR(TinyBackbone(widths=(8, 16, 16, 16), out_strides=(4, 8, 16)), len(sc.classes), d_model=16, n_heads=2, n_levels=4, n_points=2,
                n_enc=1, n_dec=2, d_ffn=32, n_queries=12, num_dn=8, gn_groups=4)
    l = m([ims[0], ims[1][:, :56, :48]], tgs)
    assert tuple(l) == m.loss_terms and all(torch.isfinite(v) for v in l.values()) and all(l[k] > 0 for k in ('enc_aux', 'd0_dn', 'd1_aux'))
    sum(l.values()).backward()
    for p in (m.label_embedding.weight, m.aux_cls_branches[1].weight, m.aux_reg_branches[0][-1].weight, m.cls_branches[3].weight, m.query_map.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad(): d = m([ims[0], ims[1][:, :56, :48]])
    assert len(d[0]['boxes']) <= 12 * len(sc.classes) and (d[1]['boxes'][:, 2] <= 48).all() and (d[1]['boxes'][:, 3] <= 56).all()
    assert ((d[0]['labels'] >= 1) & (d[0]['labels'] <= len(sc.classes))).all()
    with pytest.raises(ValueError, match='mask_mode: expected'): DDQDETR(m.backbone, 3, mask_mode='rows')
    with pytest.raises(ValueError, match='targets:'): m.train()(ims)
    with pytest.raises(TypeError, match='images: expected'): m.batch_images(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- DDQ R-CNN's DIIHead stages in the official layout

def official_ddq_rcnn_roi_layout(C=256, K=80, ffn=2048, c=64, S=7, n_stages=2, n_cls=1, n_reg=3):
    """RoI-head keys -> shapes of jshilong/DDQ `DDQRCNN` (projects/configs/ddq_rcnn/ddq_rcnn_r50_1x.py: SparseRoIHead, 2 x DIIHead),
    written from the vendored mmdet 2 code (dii_head.py: mmcv MultiheadAttention `.attn`, FFN `layers.0.0`/`layers.1`, cls/reg_fcs
    [Linear(no bias), LN, ReLU]; utils/transformer.py DynamicConv: dynamic_layer, norm_in, norm_out, fc_layer, fc_norm) and
    projects/models/ddq_fcn_rpn.py (`compress` = Linear(2C, C)); SingleRoIExtractor has no parameters."""
    k = {}
    def lin(p, o, i, bias=True):
        k[p + '.weight'] = [o, i]
        if bias: k[p + '.bias'] = [o]
    def ln(p, n=C): k[p + '.weight'] = [n]; k[p + '.bias'] = [n]
    for s in range(n_stages):
        p = f'roi_head.bbox_head.{s}'
        k[p + '.attention.attn.in_proj_weight'] = [3 * C, C]; k[p + '.attention.attn.in_proj_bias'] = [3 * C]; lin(p + '.attention.attn.out_proj', C, C)
        ln(p + '.attention_norm')
        lin(p + '.instance_interactive_conv.dynamic_layer', 2 * C * c, C); ln(p + '.instance_interactive_conv.norm_in', c)
        ln(p + '.instance_interactive_conv.norm_out'); lin(p + '.instance_interactive_conv.fc_layer', C, C * S * S); ln(p + '.instance_interactive_conv.fc_norm')
        ln(p + '.instance_interactive_conv_norm')
        lin(p + '.ffn.layers.0.0', ffn, C); lin(p + '.ffn.layers.1', C, ffn); ln(p + '.ffn_norm')
        for i in range(n_cls): lin(f'{p}.cls_fcs.{3 * i}', C, C, False); ln(f'{p}.cls_fcs.{3 * i + 1}')
        lin(p + '.fc_cls', K, C)
        for i in range(n_reg): lin(f'{p}.reg_fcs.{3 * i}', C, C, False); ln(f'{p}.reg_fcs.{3 * i + 1}')
        lin(p + '.fc_reg', 4, C)
    lin('rpn_head.compress', C, 2 * C)
    return k


def test_official_ddq_rcnn_roi_manifest_converts_and_loads():
    "The committed RoI-head manifest (written from the official code) = the layout above at R50 size; it converts onto `DDQRCNN(head='dii')` key for key, shape for shape."
    import json
    from pathlib import Path
    from xwlearn.detection.ddq import DDQFCN, convert_official_ddq_rcnn_roi_head
    from xwlearn.vision.layers import TimmFeatures
    man = json.loads((Path(__file__).parent/'fixtures'/'ddq_rcnn_r50_roi_head_keys.json').read_text())['keys']
    assert man == official_ddq_rcnn_roi_layout()
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(man.items())}
    conv, rest = convert_official_ddq_rcnn_roi_head({'state_dict': {**sd, 'backbone.conv1.weight': torch.zeros(1)}})
    assert rest == ['backbone.conv1.weight'] and len(conv) == len(man)
    with torch.device('meta'):
        m = DDQRCNN(DDQFCN(BackboneFPN(TimmFeatures('resnet50', out_indices=(2, 3, 4)), 256, p6p7=True), 80), head='dii')
    res = m.load_state_dict(conv, strict=False, assign=True)
    assert not res.unexpected_keys and all(k.startswith('rpn.') for k in res.missing_keys)
    own = m.state_dict()
    for k, v in conv.items(): assert own[k] is v or torch.equal(own[k], v), k


def _official_dii(sd, p, roi_feat, obj, heads, c):
    "DIIHead.forward + DynamicConv.forward (mmdet 2), from official-layout tensors."
    B, P, C = obj.shape
    q = _ln(sd, p + '.attention_norm', obj + _mha(sd, p + '.attention.attn', obj, torch.zeros_like(obj), torch.zeros(B * heads, P, P, dtype=torch.bool), heads))
    x = q.reshape(-1, C)
    f = roi_feat.flatten(2).permute(2, 0, 1).permute(1, 0, 2)
    prm = _lin(sd, p + '.instance_interactive_conv.dynamic_layer', x)
    pin, pout = prm[:, :C * c].view(-1, C, c), prm[:, -C * c:].view(-1, c, C)
    f = F.relu(_ln(sd, p + '.instance_interactive_conv.norm_in', torch.bmm(f, pin)))
    f = F.relu(_ln(sd, p + '.instance_interactive_conv.norm_out', torch.bmm(f, pout)))
    f = F.relu(_ln(sd, p + '.instance_interactive_conv.fc_norm', _lin(sd, p + '.instance_interactive_conv.fc_layer', f.flatten(1))))
    o = _ln(sd, p + '.instance_interactive_conv_norm', x + f)
    o = _ln(sd, p + '.ffn_norm', o + _lin(sd, p + '.ffn.layers.1', F.relu(_lin(sd, p + '.ffn.layers.0.0', o))))
    cf = F.relu(_ln(sd, p + '.cls_fcs.1', o @ sd[p + '.cls_fcs.0.weight'].T))
    rf = o
    for i in range(3): rf = F.relu(_ln(sd, f'{p}.reg_fcs.{3 * i + 1}', rf @ sd[f'{p}.reg_fcs.{3 * i}.weight'].T))
    return _lin(sd, p + '.fc_cls', cf).view(B, P, -1), _lin(sd, p + '.fc_reg', rf).view(B, P, 4), o.view(B, P, C)


def _official_delta2bbox(rois, deltas, stds=(0.5, 0.5, 1., 1.), wh_ratio_clip=16 / 1000):
    d = deltas * deltas.new_tensor(stds)
    pxy, pwh = (rois[:, :2] + rois[:, 2:]) * 0.5, rois[:, 2:] - rois[:, :2]
    m = abs(math.log(wh_ratio_clip))
    gxy, gwh = pxy + pwh * d[:, :2], pwh * d[:, 2:].clamp(min=-m, max=m).exp()
    return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], -1)


def _official_roi_extract(feats, strides, rois, out=7, finest=56):
    "SingleRoIExtractor.map_roi_levels + mmcv RoIAlign(aligned=True, sampling_ratio=2) (torchvision's aligned roi_align computes the same)."
    from torchvision.ops import roi_align
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lv = torch.floor(torch.log2(scale / finest + 1e-6)).clamp(min=0, max=len(feats) - 1).long()
    res = feats[0].new_zeros(rois.size(0), feats[0].shape[1], out, out)
    for i in range(len(feats)):
        inds = lv == i
        if inds.any(): res[inds] = roi_align(feats[i], rois[inds], out, 1 / strides[i], 2, aligned=True)
    return res


def test_converted_dii_stages_equal_the_official_forward_float64():
    "Two DIIHead stages from random official-layout tensors: converted + loaded, `dii_stages` equals the official SparseRoIHead chain in float64."
    from xwlearn.detection.ddq import DDQFCN, convert_official_ddq_rcnn_roi_head
    g = torch.Generator().manual_seed(0)
    lay = official_ddq_rcnn_roi_layout(C=16, K=3, ffn=24, c=4, S=7)
    sd = {}
    for k, s in lay.items():
        sd[k] = torch.randn(s, generator=g, dtype=torch.float64) * (0.1 if len(s) == 1 else 1 / math.sqrt(s[1]))
        if len(s) == 1 and k.endswith('weight'): sd[k] = sd[k] + 1                       # LayerNorm weights near 1
    torch.manual_seed(0)
    m = DDQRCNN(DDQFCN(BackboneFPN(TinyBackbone(widths=(8, 16, 16, 16, 16)), 16), 3), head='dii', n_heads=2, d_ffn=24, feat_channels=4).double()
    conv, _ = convert_official_ddq_rcnn_roi_head(sd)
    res = m.load_state_dict(conv, strict=False)
    assert not res.unexpected_keys and all(k.startswith('rpn.') for k in res.missing_keys)
    strides = m.rpn.head.strides
    feats = [torch.randn(2, 16, 64 // s, 64 // s, generator=g, dtype=torch.float64) for s in strides]
    c = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 48 + 8
    wh = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * 50 + 4
    props, obj = torch.cat([c - wh / 2, c + wh / 2], -1), torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    with torch.no_grad(): ours = m.dii_stages(feats, props, obj)
    p, o = props, obj
    for s, (lg, bx) in enumerate(ours):
        rois = torch.cat([torch.cat([p.new_full((5, 1), b), p[b]], 1) for b in range(2)])
        rl, rd, o = _official_dii(sd, f'roi_head.bbox_head.{s}', _official_roi_extract(feats, strides, rois), o, 2, 4)
        rb = _official_delta2bbox(rois[:, 1:], rd.reshape(-1, 4)).view(2, 5, 4)
        torch.testing.assert_close(lg, rl, rtol=1e-9, atol=1e-9); torch.testing.assert_close(bx, rb, rtol=1e-9, atol=1e-9)
        p = rb
    assert not torch.allclose(ours[1][1], props)                                         # the boxes moved


def test_ddq_rcnn_dii_forward_backward():
    m = _tiny()
    rc = DDQRCNN(m, n_proposals=20, head='dii', n_heads=2, d_ffn=32, feat_channels=4)
    ims = [torch.randint(0, 255, (3, 48, 40), dtype=torch.uint8), torch.rand(3, 32, 64)]
    tg = [dict(boxes=torch.tensor([[4., 4., 20., 30.], [10., 10., 30., 30.]]), labels=torch.tensor([1, 3])),
          dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    l = rc(ims, tg)
    assert {f's{k}_{t}' for k in (0, 1) for t in ('cls', 'l1', 'giou')} <= set(l) and all(torch.isfinite(v) for v in l.values())
    sum(l.values()).backward()
    assert rc.compress.weight.grad.abs().sum() > 0 and rc.stages[1].fc_cls.weight.grad.abs().sum() > 0
    assert m.head.cls_convs[0][0].weight.grad is not None          # the RPN trains through its own losses
    rc.eval()
    with torch.no_grad(): d = rc(ims)
    assert all(len(x['boxes']) <= 20 and ((x['labels'] >= 1) & (x['labels'] <= 3)).all() for x in d)
    with pytest.raises(ValueError, match='head: expected'): DDQRCNN(m, head='cascade')


def official_ddq_rcnn_neck_rpn_layout(ins=(256, 512, 1024, 2048), C=256, K=80, n_convs=4, n_levels=5):
    """Neck and RPN-head keys -> shapes of jshilong/DDQ `DDQRCNN` (ddq_rcnn_r50_1x.py), written from the vendored mmdet 2 code:
    necks/fpn.py with start_level=0, num_outs=len(ins)+2, add_extra_convs='on_input' (fpn_convs[len(ins)] reads the last input);
    DDQFCNRPN = DDQFCNHead (ConvModule(conv no bias, gn), objectness 1x1 -> ReLU -> 3x3, conv_cls/conv_reg, a Scale per level,
    the same for aux_*) + compress = Linear(2C, C)."""
    k = {}
    for i, c in enumerate(ins): k[f'neck.lateral_convs.{i}.conv.weight'] = [C, c, 1, 1]; k[f'neck.lateral_convs.{i}.conv.bias'] = [C]
    for i in range(len(ins) + 2): k[f'neck.fpn_convs.{i}.conv.weight'] = [C, ins[-1] if i == len(ins) else C, 3, 3]; k[f'neck.fpn_convs.{i}.conv.bias'] = [C]
    for t in ('cls', 'reg'):
        for i in range(n_convs): k[f'rpn_head.{t}_convs.{i}.conv.weight'] = [C, C, 3, 3]; k[f'rpn_head.{t}_convs.{i}.gn.weight'] = [C]; k[f'rpn_head.{t}_convs.{i}.gn.bias'] = [C]
    for a in ('', 'aux_'):
        o = 'rpn_head.' + ('aux_conv_objectness' if a else 'objectness')
        k[o + '.0.weight'] = [C // 4, C, 1, 1]; k[o + '.0.bias'] = [C // 4]; k[o + '.2.weight'] = [1, C // 4, 3, 3]; k[o + '.2.bias'] = [1]
        k[f'rpn_head.{a}conv_cls.weight'] = [K, C, 3, 3]; k[f'rpn_head.{a}conv_cls.bias'] = [K]
        k[f'rpn_head.{a}conv_reg.weight'] = [4, C, 3, 3]; k[f'rpn_head.{a}conv_reg.bias'] = [4]
        for i in range(n_levels): k[f'rpn_head.{a}scales.{i}.scale'] = []
    k['rpn_head.compress.weight'] = [C, 2 * C]; k['rpn_head.compress.bias'] = [C]
    return k


def test_official_ddq_rcnn_manifest_converts_and_loads_strictly():
    "The full DDQ R-CNN R50 manifest (written from the code; ResNet keys from the dumped DDQ-FCN manifest) converts onto `ddq_rcnn_r50()` and loads strictly."
    import json
    from pathlib import Path
    from xwlearn.detection.ddq import ddq_rcnn_r50, convert_official_ddq_rcnn
    fx = Path(__file__).parent/'fixtures'
    man = json.loads((fx/'ddq_rcnn_r50_keys.json').read_text())['keys']
    fcn = json.loads((fx/'ddq_fcn_r50_keys.json').read_text())['keys']
    assert {k: v for k, v in man.items() if k.startswith('backbone.')} == {k: v for k, v in fcn.items() if k.startswith('backbone.')}
    assert {k: v for k, v in man.items() if k.startswith('rpn_head.') and 'compress' not in k} == {'rpn_head.' + k[10:]: v for k, v in fcn.items() if k.startswith('bbox_head.')}
    lay = {**official_ddq_rcnn_neck_rpn_layout(), **official_ddq_rcnn_roi_layout()}
    assert {k: v for k, v in man.items() if not k.startswith('backbone.')} == lay and len(man) == 470
    sd = {k: (torch.zeros(s, dtype=torch.long) if k.endswith('num_batches_tracked') else torch.empty(s)) for k, s in man.items()}
    conv = convert_official_ddq_rcnn({'meta': {}, 'state_dict': sd})
    assert len(conv) == len(man) and len({id(v) for v in conv.values()}) == len(man)
    with torch.device('meta'): m = ddq_rcnn_r50()
    m.load_state_dict(conv, strict=True, assign=True)
    own = m.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() for k, v in conv.items() if v.numel())
    assert m.rpn.fpn.strides == [4, 8, 16, 32, 64, 128] and m.rpn.head.strides == [8, 16, 32, 64, 128]
    assert m.rpn.fpn.fpn.extra_blocks.p6.in_channels == 2048 and not m.rpn.fpn.fpn.extra_blocks.relu
    with pytest.raises(KeyError, match='unexpected key'): convert_official_ddq_rcnn({'neck.fpn_convs.6.conv.weight': torch.zeros(1)})
    with pytest.raises(KeyError, match='unexpected key'): convert_official_ddq_rcnn({'rpn_head.foo.weight': torch.zeros(1)})
    with pytest.raises(TypeError, match='state_dict must be a dict'): convert_official_ddq_rcnn([1])


def _official_conv_gn_relu(sd, p, x, groups):
    return F.relu(F.group_norm(F.conv2d(x, sd[p + '.conv.weight'], None, 1, 1), groups, sd[p + '.gn.weight'], sd[p + '.gn.bias']))


def _official_shuffle(feats, s):
    "DDQFCNHead._single_shuffle's fused inputs: own first C-2s channels, the last s of the level above, s of the level below (bilinear, align_corners)."
    L, C = len(feats), feats[0].shape[1]
    r, out = C - 2 * s, []
    for l, t in enumerate(feats):
        top, down = feats[min(l + 1, L - 1)], feats[max(l - 1, 0)]
        up = F.interpolate(top[:, r:][:, s:], size=t.shape[-2:], mode='bilinear', align_corners=True)
        dn = F.interpolate(down[:, r:][:, :s], size=t.shape[-2:], mode='bilinear', align_corners=True)
        out.append(torch.cat([t[:, :r], up, dn], 1))
    return out


def _official_neck_and_rpn(sd, cs, groups, s, strides):
    "mmdet FPN.forward (start_level 0, 'on_input', no ReLU before the extra convs) and DDQFCNHead.forward on P3-P7, from official-layout tensors."
    lat = [F.conv2d(c, sd[f'neck.lateral_convs.{i}.conv.weight'], sd[f'neck.lateral_convs.{i}.conv.bias']) for i, c in enumerate(cs)]
    for i in range(len(lat) - 1, 0, -1): lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode='nearest')
    outs = [F.conv2d(l, sd[f'neck.fpn_convs.{i}.conv.weight'], sd[f'neck.fpn_convs.{i}.conv.bias'], 1, 1) for i, l in enumerate(lat)]
    n = len(lat)
    outs.append(F.conv2d(cs[-1], sd[f'neck.fpn_convs.{n}.conv.weight'], sd[f'neck.fpn_convs.{n}.conv.bias'], 2, 1))
    outs.append(F.conv2d(outs[-1], sd[f'neck.fpn_convs.{n + 1}.conv.weight'], sd[f'neck.fpn_convs.{n + 1}.conv.bias'], 2, 1))
    c = r = outs[1:]
    for i in range(4): c = [_official_conv_gn_relu(sd, f'rpn_head.cls_convs.{i}', f, groups) for f in (_official_shuffle(c, s) if i > 1 else c)]
    for i in range(4): r = [_official_conv_gn_relu(sd, f'rpn_head.reg_convs.{i}', f, groups) for f in (_official_shuffle(r, s) if i > 2 else r)]
    res = {}
    for a in ('', 'aux_'):
        o = 'rpn_head.' + ('aux_conv_objectness' if a else 'objectness')
        score, ltrb = [], []
        for l, (cf, rf, st) in enumerate(zip(c, r, strides)):
            obj = F.conv2d(F.relu(F.conv2d(rf, sd[o + '.0.weight'], sd[o + '.0.bias'])), sd[o + '.2.weight'], sd[o + '.2.bias'], 1, 1)
            cls = F.conv2d(cf, sd[f'rpn_head.{a}conv_cls.weight'], sd[f'rpn_head.{a}conv_cls.bias'], 1, 1)
            dist = sd[f'rpn_head.{a}scales.{l}.scale'] * F.conv2d(rf, sd[f'rpn_head.{a}conv_reg.weight'], sd[f'rpn_head.{a}conv_reg.bias'], 1, 1).exp()
            score.append((cls.sigmoid() * obj.sigmoid()).sqrt().flatten(2).transpose(1, 2))        # sigmoid_geometric_mean
            ltrb.append((dist * st).flatten(2).transpose(1, 2))                                    # _get_topk: bbox_pred * stride
        res[a or 'main'] = dict(score=torch.cat(score, 1), ltrb=torch.cat(ltrb, 1))
    return outs, res, (c, r)


def test_converted_ddq_rcnn_pyramid_and_rpn_head_equal_the_official_forward_float64():
    "Random official-layout neck + RPN head (C=128: GN(32) as the official 256-wide head, shuffle C/4) converted and loaded: P2-P7, the RPN's scores, distances and tower features equal the official computation in float64."
    from xwlearn.detection.ddq import convert_official_ddq_rcnn
    g = torch.Generator().manual_seed(0)
    C, K = 128, 3
    torch.manual_seed(0)
    bb = TinyBackbone(widths=(8, 16, 16, 16, 24), out_strides=(4, 8, 16, 32))
    m = DDQRCNN(DDQFCN(BackboneFPN(bb, C, p6p7='c5'), K, start_level=1), head='dii', n_heads=2, d_ffn=16, feat_channels=4).double()
    lay = official_ddq_rcnn_neck_rpn_layout(tuple(bb.channels), C, K)
    sd = {}
    for k, s in lay.items():
        fan = math.prod(s[1:]) if len(s) > 1 else 1
        sd[k] = torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(fan) if len(s) > 1 else 0.1 * torch.randn(s, generator=g, dtype=torch.float64)
        if k.endswith('gn.weight') or k.endswith('.scale'): sd[k] = sd[k] + 1
        if 'conv_reg' in k: sd[k] = sd[k] * 0.3                                            # keep exp() of the distances moderate
    conv = convert_official_ddq_rcnn(sd)
    res = m.load_state_dict(conv, strict=False)
    assert not res.unexpected_keys and all(k.startswith(('rpn.fpn.body.', 'stages.')) for k in res.missing_keys)
    x = torch.randn(2, 3, 96, 64, generator=g, dtype=torch.float64)
    with torch.no_grad():
        cs = m.rpn.fpn.body(x)
        feats = m.rpn.fpn(x)
        m.train(); out = m.rpn.head(feats[m.rpn.start_level:])
    ref_p, ref, (rc, rr) = _official_neck_and_rpn(sd, cs, 32, C // 4, m.rpn.head.strides)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    for a, b in zip(feats, ref_p): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for br in ('main', 'aux_'):
        ours = out['main' if br == 'main' else 'aux']
        torch.testing.assert_close(ours['score'], ref[br]['score'], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours['ltrb'], ref[br]['ltrb'], rtol=1e-10, atol=1e-10)
    for a, b in zip(out['towers'][0] + out['towers'][1], rc + rr): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert out['main']['score'].std() > 1e-3 and out['main']['ltrb'].std() > 1e-3                     # not a degenerate comparison
