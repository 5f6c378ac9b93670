"""Group R-CNN (`xwlearn.detection.group_rcnn`) against independent references.

The references are written from the paper's and the official code's rules (jshilong/GroupRCNN `projects/models/
group_rcnn.py`, `group_roi_head.py` at 5e9fe03): brute-force nearest locations, a greedy NMS written out, RoIAlign of the
explicit coordinate map, the official grouped `F.conv2d`, and a first-survivor selection written as a loop.
"""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, roi_align

from xwlearn.vision.layers import level_points
from xwlearn.detection.group_rcnn import (nearest_locations, group_proposals, instance_assign, max_iou_assign_all,
                                          relative_coords, pooled_coords, dynamic_group_conv, one_box_per_point,
                                          GroupRoIHead, GroupRCNN, roi_levels)

torch.set_num_threads(1)
D = torch.float64


def rand_boxes(g, *shape, lo=0., hi=48., min_size=4., max_size=24.):
    xy = lo + torch.rand(*shape, 2, generator=g, dtype=D) * (hi - lo)
    return torch.cat([xy, xy + min_size + torch.rand(*shape, 2, generator=g, dtype=D) * (max_size - min_size)], -1)


def greedy_nms(boxes, scores, idxs, thr):
    "Greedy NMS per index, written out: survivors by decreasing score."
    alive, kept = torch.ones(len(boxes), dtype=torch.bool), []
    for q in scores.argsort(descending=True, stable=True).tolist():
        if not alive[q]: continue
        kept.append(q); alive[q] = False
        alive &= ~((idxs == idxs[q]) & (box_iou(boxes[q:q + 1], boxes)[0] > thr))
    return kept


@pytest.mark.parametrize("seed", range(3))
def test_nearest_locations_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    sizes, strides = [(8, 6), (4, 3), (2, 2)], [8, 16, 32]
    pts = torch.rand(5, 2, generator=g, dtype=D) * torch.tensor([48., 64.], dtype=D)
    idx = nearest_locations(pts, sizes, strides, k=4)
    locs, _ = level_points(sizes, strides, dtype=D)
    start = 0
    for l, (h, w) in enumerate(sizes):
        d = torch.cdist(pts, locs[start:start + h * w])
        got = idx[:, 4 * l:4 * l + 4] - start
        # the chosen distances are the 4 smallest (ties may pick either location)
        assert torch.allclose(d.gather(1, got).sort(1).values, d.sort(1).values[:, :4])
        start += h * w
    assert nearest_locations(pts, [(1, 1)], [8], k=3).shape == (5, 1)   # k is clamped to the level's size


def test_group_proposals_match_greedy_reference():
    g = torch.Generator().manual_seed(0)
    M, G0, top = 6, 9, 4
    ctr = torch.rand(M, 1, 2, generator=g, dtype=D) * 20 + 10
    ctr[3] = ctr[0]                                           # two same-class points on one object: their groups collide
    boxes = torch.cat([ctr - 8 + torch.rand(M, G0, 2, generator=g, dtype=D) * 3, ctr + 8 + torch.rand(M, G0, 2, generator=g, dtype=D) * 3], -1)
    scores = torch.rand(M, G0, generator=g, dtype=D)
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    pb, ps, pv = group_proposals(boxes, scores, labels, 0.7, top)
    grp = torch.arange(M).repeat_interleave(G0)
    kept = greedy_nms(boxes.reshape(-1, 4), scores.reshape(-1), labels[grp], 0.7)
    for m in range(M):
        mine = [q for q in kept if grp[q] == m][:top]
        if mine:
            assert pv[m].sum() == len(mine)
            assert torch.equal(pb[m, :len(mine)], boxes.reshape(-1, 4)[mine]) and torch.equal(ps[m, :len(mine)], scores.reshape(-1)[mine])
        else:                                                  # fully suppressed: the group keeps its own best candidate
            assert pv[m].sum() == 1 and torch.equal(pb[m, 0], boxes[m, scores[m].argmax()])
    assert pv[:, 0].all() and (pb[~pv] == 0).all()


def test_group_proposals_errors():
    with pytest.raises(ValueError, match="scores: expected"):
        group_proposals(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: expected"):
        group_proposals(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("seed", range(3))
def test_instance_assignment_never_crosses_instances(seed):
    g = torch.Generator().manual_seed(seed)
    gt = torch.tensor([[10., 10., 40., 40.], [20., 12., 50., 42.], [12., 20., 42., 50.]], dtype=D)   # same class, overlapping
    lab = torch.zeros(3, dtype=torch.long)
    # every group mixes jittered copies of all three boxes
    props = gt[torch.randint(0, 3, (3, 30), generator=g)] + torch.randn(3, 30, 4, generator=g, dtype=D) * 2
    t_lab, t_box = instance_assign(props, gt, lab, 0.5, num_classes=1)
    iou_all = box_iou(props.reshape(-1, 4), gt).view(3, 30, 3)
    own = iou_all[torch.arange(3), :, torch.arange(3)]
    assert torch.equal(t_lab == 0, own > 0.5)                           # positive iff it fits its own instance
    assert torch.equal(t_box, gt[:, None].expand(-1, 30, -1))          # targets are the group's own box only
    v_lab, v_box = max_iou_assign_all(props, gt, lab, 0.5, num_classes=1)
    crossed = (v_lab == 0) & ~(v_box == gt[:, None]).all(-1)           # vanilla: positives regressed to another instance
    assert crossed.any() and not (crossed & (t_lab == 0) & ~(t_box == gt[:, None]).all(-1)).any()


@pytest.mark.parametrize("stride", [8., 16.])
def test_pooled_coords_equal_roi_align_of_the_map(stride):
    g = torch.Generator().manual_seed(1)
    size = (int(64 // stride),) * 2
    pts = torch.rand(4, 2, generator=g, dtype=D) * 60
    R = relative_coords(pts, size, stride)
    locs, _ = level_points([size], [stride], dtype=D)
    assert torch.allclose(R[2].flatten(1).T, (pts[2] - locs) / stride)
    boxes = rand_boxes(g, 10, lo=stride / 2, hi=30.)                   # RoIs inside the map's sampled area
    inst = torch.randint(0, 4, (10,), generator=g)
    ref = roi_align(R, torch.cat([inst[:, None].to(D), boxes], 1), 7, 1 / stride, sampling_ratio=0, aligned=True)
    assert torch.allclose(pooled_coords(pts[inst], boxes, torch.full((10,), stride, dtype=D)), ref, atol=1e-10)


def test_roi_levels_rule():
    b = torch.tensor([[0., 0., 55., 55.], [0., 0., 111., 113.], [0., 0., 112., 112.], [0., 0., 224., 224.], [0., 0., 10., 900.], [0., 0., 999., 999.]])
    assert roi_levels(b, 4).tolist() == [0, 0, 1, 2, 0, 3]             # floor(log2(sqrt(wh)/56 + 1e-6)), clamped


def test_dynamic_group_conv_equals_grouped_conv_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    M, G, C = 3, 5, 4
    x, W = torch.randn(M, G, C, 3, 3, generator=g, dtype=D), torch.randn(M, C, C, generator=g, dtype=D)
    ref = F.conv2d(x.transpose(0, 1).reshape(G, M * C, 3, 3), W.reshape(M * C, C, 1, 1), groups=M).view(G, M, C, 3, 3).transpose(0, 1)
    assert torch.allclose(dynamic_group_conv(x, W), ref, atol=1e-12)
    assert torch.autograd.gradcheck(dynamic_group_conv, (x[:2, :2, :, :2, :2].clone().requires_grad_(), W[:2].clone().requires_grad_()))
    with pytest.raises(ValueError, match="feats, weights"):
        dynamic_group_conv(x, W[:, :, :2])


def select_reference(boxes, scores, valid, labels, thr):
    M, G = scores.shape
    ok = valid.reshape(-1).nonzero()[:, 0]
    grp = torch.arange(M).repeat_interleave(G)
    kept = [ok[q].item() for q in greedy_nms(boxes.reshape(-1, 4)[ok], scores.reshape(-1)[ok], labels[grp[ok]], thr)]
    out = []
    for m in range(M):
        mine = [q for q in kept if grp[q] == m]
        out.append(mine[0] if mine else m * G + scores[m].masked_fill(~valid[m], -1).argmax().item())
    return boxes.reshape(-1, 4)[out]


@pytest.mark.parametrize("seed", range(5))
def test_exactly_one_box_per_point(seed):
    g = torch.Generator().manual_seed(seed)
    M, G = int(torch.randint(1, 7, (), generator=g)), int(torch.randint(1, 8, (), generator=g))
    boxes = rand_boxes(g, M, G, hi=20.)                                  # crowded: groups overlap a lot
    scores = torch.rand(M, G, generator=g, dtype=D)
    valid = torch.rand(M, G, generator=g) < 0.7; valid[:, 0] = True
    labels = torch.randint(0, 2, (M,), generator=g)
    ob, os_ = one_box_per_point(boxes, scores, valid, labels, 0.5)
    assert ob.shape == (M, 4) and os_.shape == (M,)
    assert torch.equal(ob, select_reference(boxes, scores, valid, labels, 0.5))
    for m in range(M): assert (boxes[m][valid[m]] == ob[m]).all(1).any()   # from the point's own group
    with pytest.raises(ValueError, match="valid: expected"):
        one_box_per_point(boxes, scores, torch.zeros_like(valid), labels)


def _tiny(**kw):
    torch.manual_seed(0)
    return GroupRCNN(2, channels=16, fc=32, top_n=6, **kw)


@pytest.mark.parametrize("kw", [{}, dict(instance_aware=False, assign='max_iou')])
def test_detector_one_box_per_point_and_losses(kw):
    det = _tiny(**kw)
    x = torch.rand(3, 3, 64, 64)
    tg = [dict(points=torch.tensor([[20., 20.], [30., 22.], [31., 23.]]), labels=torch.tensor([0, 0, 1]),
               boxes=torch.tensor([[10., 10., 40., 40.], [20., 12., 50., 42.], [25., 15., 45., 35.]])),
          dict(points=torch.zeros(0, 2), labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4)),
          dict(points=torch.tensor([[40., 45.]]), labels=torch.tensor([1]), boxes=torch.tensor([[30., 30., 50., 60.]]))]
    losses = det(x, tg)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    det.eval()
    out = det(x, [dict(points=t['points'], labels=t['labels']) for t in tg])
    assert [len(o['boxes']) for o in out] == [3, 0, 1] and torch.equal(out[0]['labels'], tg[0]['labels'])


def test_detector_errors():
    det = _tiny()
    with pytest.raises(ValueError, match="images: expected"):
        det(torch.rand(3, 64, 64), [])
    with pytest.raises(ValueError, match="labels: expected one class per point"):
        det.eval()(torch.rand(1, 3, 64, 64), [dict(points=torch.zeros(2, 2), labels=torch.zeros(3, dtype=torch.long))])
    with pytest.raises(ValueError, match="training needs 'boxes'"):
        det.train()(torch.rand(1, 3, 64, 64), [dict(points=torch.zeros(1, 2), labels=torch.zeros(1, dtype=torch.long))])
    with pytest.raises(ValueError, match="assign: expected"):
        GroupRoIHead(8, 2, [8], assign='hungarian')


def test_official_manifest_converts_onto_the_r50_model():
    "The committed manifest of the official checkpoint (names + shapes, from the official model definition) → a GroupRCNN on ResNet-50-FPN."
    import json
    from pathlib import Path
    from xwlearn.detection.group_rcnn import convert_official_group_rcnn
    from xwlearn.vision.layers import TimmFeatures, BackboneFPN
    keys = json.loads((Path(__file__).parent / 'fixtures' / 'group_rcnn_official_keys.json').read_text())['keys']
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith('num_batches_tracked') else torch.randn(s, generator=g)) for k, s in keys.items()}
    conv, left = convert_official_group_rcnn(sd)
    assert sorted(left) == sorted(k for k in keys if k.startswith('rpn_head.') or k.startswith('neck.fpn_convs.3.'))
    model = GroupRCNN(80, fpn=BackboneFPN(TimmFeatures('resnet50', out_indices=(2, 3, 4)), 256, p6p7=True))
    missing, unexpected = model.load_state_dict(conv, strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(k for k in model.state_dict() if k.startswith('rpn_head.') or k.startswith('fpn.fpn.extra_blocks.p6.'))
    msd = model.state_dict()
    for k, v in conv.items(): assert torch.equal(msd[k], v), k
