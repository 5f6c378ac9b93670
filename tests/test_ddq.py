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
                                   distinct_attn_mask)
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
    m = distinct_attn_mask(alive, n_heads=2, n_dense=3, dn_mask=dn)
    assert m.shape == (6, 14, 14)
    for b in range(3):
        for i in range(14):
            for j in range(14):
                grp = lambda k: 0 if k < 11 else 1
                want = (bool(dn[i, j]) if i < 11 and j < 11 else grp(i) != grp(j))
                if 4 <= i < 11 and not alive[b, i - 4]: want = True
                if 4 <= j < 11 and not alive[b, j - 4]: want = True
                if i == j: want = False
                assert m[2 * b, i, j].item() == want and m[2 * b + 1, i, j].item() == want
    with pytest.raises(ValueError, match='dn_mask: expected'): distinct_attn_mask(alive, 1, dn_mask=torch.zeros(3, 3, dtype=torch.bool))


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
    "Every key of the official DDQ-FCN R50 (manifest dumped from the official model definition) has a slot of its shape, except P6."
    import json
    from pathlib import Path
    from xwlearn.detection.ddq import convert_official_ddq_fcn
    from xwlearn.vision.layers import TimmFeatures
    man = json.loads((Path(__file__).parent/'fixtures'/'ddq_fcn_r50_keys.json').read_text())['keys']
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith('num_batches_tracked') else torch.randn(s, generator=g)) for k, s in man.items()}
    conv, skipped = convert_official_ddq_fcn({'meta': {}, 'state_dict': sd})
    assert skipped == ['neck.0.fpn_convs.3.conv.weight', 'neck.0.fpn_convs.3.conv.bias']
    assert len(conv) == len(man) - 2
    m = DDQFCN(BackboneFPN(TimmFeatures('resnet50', out_indices=(2, 3, 4)), 256, p6p7=True), 80)
    res = m.load_state_dict(conv, strict=False)
    assert not res.unexpected_keys and sorted(res.missing_keys) == ['fpn.fpn.extra_blocks.p6.bias', 'fpn.fpn.extra_blocks.p6.weight']
    own = m.state_dict()
    for k, v in conv.items(): assert torch.equal(own[k], v.to(own[k].dtype)), k
    with pytest.raises(KeyError, match='unexpected key'): convert_official_ddq_fcn({'rpn_head.conv_cls.weight': torch.zeros(1)})
    with pytest.raises(TypeError, match='state_dict must be a dict'): convert_official_ddq_fcn([1])
