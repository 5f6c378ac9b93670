"""Group R-CNN (`xwlearn.detection.group_rcnn`) against independent references.

The references are written from the paper's and the official code's rules (jshilong/GroupRCNN `projects/models/
group_rcnn.py`, `group_roi_head.py` at 5e9fe03): brute-force nearest locations, a greedy NMS written out, RoIAlign of the
explicit coordinate map, the official grouped `F.conv2d`, and a first-survivor selection written as a loop.
"""
import math

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


def test_group_proposals_without_cross_group_nms():
    "The no-grouping ablation: NMS within each group only, so identical groups keep identical proposals."
    g = torch.Generator().manual_seed(4)
    boxes = rand_boxes(g, 1, 12, hi=20.).expand(3, -1, -1).clone()
    scores = torch.rand(1, 12, generator=g, dtype=D).expand(3, -1).clone()
    pb, ps, pv = group_proposals(boxes, scores, torch.zeros(3, dtype=torch.long), 0.5, 5, cross=False)
    kept = greedy_nms(boxes[0], scores[0], torch.zeros(12, dtype=torch.long), 0.5)[:5]
    for m in range(3): assert torch.equal(pb[m, :len(kept)], boxes[0, kept]) and pv[m].sum() == len(kept)
    cb, _, cv = group_proposals(boxes, scores, torch.zeros(3, dtype=torch.long), 0.5, 5)
    assert cv[1:].sum(1).tolist() == [1, 1]                           # with cross-group NMS the copies are suppressed


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


@pytest.mark.parametrize("kw", [{}, dict(instance_aware=False, assign='max_iou'), dict(rpn='retina'), dict(grouping=False)])
def test_detector_one_box_per_point_and_losses(kw):
    det = _tiny(**kw)
    x = torch.rand(3, 3, 64, 64)
    tg = [dict(points=torch.tensor([[20., 20.], [30., 22.], [31., 23.]]), labels=torch.tensor([0, 0, 1]),
               boxes=torch.tensor([[10., 10., 40., 40.], [20., 12., 50., 42.], [25., 15., 45., 35.]])),
          dict(points=torch.zeros(0, 2), labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4)),
          dict(points=torch.tensor([[40., 45.]]), labels=torch.tensor([1]), boxes=torch.tensor([[30., 30., 50., 60.]]))]
    losses = det(x, tg)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {'rpn.cls', 'rpn.box', 's0.cls', 's2.box'} <= set(losses)
    sum(losses.values()).backward()
    head = det.rpn_head.classification_head.cls_logits if kw.get('rpn') == 'retina' else det.rpn_head.cls_out
    assert head.weight.grad.abs().sum() > 0
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


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoint: the committed manifest (names + shapes written from the official model definition, not from our
# mapping), random weights in that layout, strict load, and the official test path written out in float64.

@pytest.fixture(scope='module')
def official_sd():
    "Random well-scaled weights in the official layout, float64: uniform with the fan-in variance for convs/linears, BN/GN scales near 1."
    import json
    from pathlib import Path
    keys = json.loads((Path(__file__).parent / 'fixtures' / 'group_rcnn_official_keys.json').read_text())['keys']
    g, sd, big = torch.Generator().manual_seed(0), {}, {}
    u = lambda s, a: torch.empty(s, dtype=D).uniform_(-a, a, generator=g)
    for k, s in keys.items():
        if k.endswith('num_batches_tracked'): sd[k] = torch.tensor(7)
        elif k.endswith('running_var'): sd[k] = 0.5 + torch.rand(s, generator=g, dtype=D)
        elif len(s) >= 2 and math.prod(s) > 4_000_000:   # the three stages' big FC / generator matrices: one draw per shape, rolled per stage
            if tuple(s) not in big: big[tuple(s)] = u(s, (3 / math.prod(s[1:])) ** 0.5)
            sd[k] = big[tuple(s)].roll(int(k.split('.')[2]) * 7919, 0)
        elif len(s) >= 2: sd[k] = u(s, (3 / math.prod(s[1:])) ** 0.5)
        elif k.endswith('weight'): sd[k] = 0.8 + 0.4 * torch.rand(s, generator=g, dtype=D)      # BN / GN scales
        else: sd[k] = u(s, 0.2)                                                              # biases, running means
    return keys, sd


@pytest.fixture(scope='module')
def converted(official_sd):
    from xwlearn.detection.group_rcnn import convert_official_group_rcnn, official_group_rcnn
    keys, sd = official_sd
    conv, left = convert_official_group_rcnn(sd)
    assert left == []                                                    # every official tensor has a place
    with torch.device('meta'): model = official_group_rcnn(top_n=4)
    model.load_state_dict(conv, strict=True, assign=True)              # strict: no missing, no unexpected key
    return model.eval()


def test_official_manifest_loads_strictly(official_sd, converted):
    keys, sd = official_sd
    msd = converted.state_dict()
    assert len(msd) == len(keys) == 393
    from xwlearn.detection.group_rcnn import convert_official_group_rcnn
    for k, v in convert_official_group_rcnn(sd)[0].items(): assert msd[k] is v or torch.equal(msd[k], v), k


def _delta2bbox(rois, d, stds, max_shape):
    "mmdet 2.x `delta2bbox` (DeltaXYWHBBoxCoder.decode) with means 0, written out."
    d = d * torch.tensor(stds, dtype=d.dtype)
    r = abs(math.log(16 / 1000))
    px, py = (rois[:, 0] + rois[:, 2]) / 2, (rois[:, 1] + rois[:, 3]) / 2
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    gw, gh = pw * d[:, 2].clamp(-r, r).exp(), ph * d[:, 3].clamp(-r, r).exp()
    H, W = max_shape
    return torch.stack([(gx - gw / 2).clamp(0, W), (gy - gh / 2).clamp(0, H), (gx + gw / 2).clamp(0, W), (gy + gh / 2).clamp(0, H)], -1)


def _select_first(boxes, scores, labels, thr, num_gt):
    "Official `batched_nms` (max_num 1000) over a (bag, num_gt) stack, flattened bag-major: the survivors and each gt's first one."
    flat_b, flat_s = boxes.reshape(-1, 4), scores.reshape(-1)
    lab = labels[None].expand(scores.shape).reshape(-1)
    keep = greedy_nms(flat_b, flat_s, lab, thr)[:1000]
    return keep, [[q for q in keep if q % num_gt == g] for g in range(num_gt)]


def official_reference(sd, x, points, labels, top_n, k=3):
    "The official `GroupRCNN.simple_test` (one image) from the official-layout tensors: neck, RetinaHead, grouping, cascade, selection."
    import torchvision
    W = lambda n: sd[n]
    conv = lambda f, n, **kw: F.conv2d(f, W(n + '.weight'), W(n + '.bias'), **kw)
    H_img, W_img = x.shape[-2:]
    with torch.device('meta'): r50 = torchvision.models.resnet50()      # torchvision names = mmdet ResNet names
    r50.load_state_dict({n[9:]: v for n, v in sd.items() if n.startswith('backbone.')}, strict=False, assign=True)
    r50.eval()
    f = r50.maxpool(r50.relu(r50.bn1(r50.conv1(x))))
    cs = []
    for layer in (r50.layer1, r50.layer2, r50.layer3, r50.layer4): f = layer(f); cs.append(f)
    lat = [conv(c, f'neck.lateral_convs.{i}.conv') for i, c in enumerate(cs[1:])]          # start_level=1: C3-C5
    for i in (2, 1): lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode='nearest')
    P = [conv(l, f'neck.fpn_convs.{i}.conv', padding=1) for i, l in enumerate(lat)]
    P.append(conv(cs[-1], 'neck.fpn_convs.3.conv', stride=2, padding=1))                   # add_extra_convs='on_input'
    P.append(conv(P[-1], 'neck.fpn_convs.4.conv', stride=2, padding=1))                    # no ReLU before P7
    strides, A = [8, 16, 32, 64, 128], 9
    scales = torch.tensor([4 * 2 ** (i / 3) for i in range(3)], dtype=D)
    h_r = torch.tensor([0.5, 1., 2.], dtype=D).sqrt(); w_r = 1 / h_r
    lb, ls, grids = [], [], []
    for lvl, (p, s) in enumerate(zip(P, strides)):
        c, r = p, p
        for i in range(4): c, r = F.relu(conv(c, f'rpn_head.cls_convs.{i}.conv', padding=1)), F.relu(conv(r, f'rpn_head.reg_convs.{i}.conv', padding=1))
        sc = conv(c, 'rpn_head.retina_cls', padding=1)[0].permute(1, 2, 0).reshape(-1, 80).sigmoid()
        dl = conv(r, 'rpn_head.retina_reg', padding=1)[0].permute(1, 2, 0).reshape(-1, 4)
        h, w = p.shape[-2:]
        ws, hs = (s * w_r[:, None] * scales[None]).reshape(-1), (s * h_r[:, None] * scales[None]).reshape(-1)
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], -1)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=D) * s, torch.arange(w, dtype=D) * s, indexing='ij')
        grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1); grids.append(grid)
        anchors = (torch.cat([grid, grid], -1)[:, None] + base[None]).reshape(-1, 4)
        near = ((grid[:, None] - points[None]) ** 2).sum(-1).topk(k, dim=0, largest=False).indices     # (k, num_gt)
        ridx = torch.cat([near * A + a for a in range(A)], 0).reshape(-1)                            # official repeat_index
        lb.append(_delta2bbox(anchors[ridx], dl[ridx], (1., 1., 1., 1.), (H_img, W_img)).view(A * k, -1, 4))
        ls.append(sc[ridx].view(A * k, -1, 80))
    bag_b, bag_s = torch.cat(lb), torch.cat(ls).gather(2, labels[None, :, None].expand(len(torch.cat(lb)), -1, 1))[..., 0]
    n = len(labels)
    keep, per_gt = _select_first(bag_b, bag_s, labels, 0.7, n)
    assert all(len(m) >= top_n for m in per_gt), "the reference assumes full groups"
    props = torch.stack([bag_b.reshape(-1, 4)[m[:top_n]] for m in per_gt], 1)               # (top_n, num_gt, 4)
    # RoI head (GroupRoIHead.simple_test): projection conv, coordinate maps on mmdet's grid, 4 RoI levels
    X = [F.relu(conv(p, 'projection_convs.0', padding=1)) for p in P]
    coords = [((points[:, None] - g[None]) / s).view(n, *p.shape[-2:], 2).permute(0, 3, 1, 2) for g, s, p in zip(grids, strides, P)]
    def extract(feats, rois):
        sc_ = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
        lvl = torch.floor(torch.log2(sc_ / 56 + 1e-6)).clamp(0, 3).long()
        out = feats[0].new_zeros(len(rois), feats[0].shape[1], 7, 7)
        for l in range(4):
            i = lvl == l
            if i.any(): out[i] = roi_align(feats[l], rois[i], 7, 1 / strides[l], sampling_ratio=0, aligned=True)
        return out
    gt_idx = torch.arange(n, dtype=D).repeat(top_n)[:, None]                                # bag-major, as bbox2roi
    rois, probs = props.reshape(-1, 4), 0
    for stage, stds in enumerate(((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))):
        bf = torch.cat([extract(X, torch.cat([torch.zeros_like(gt_idx), rois], 1)), extract(coords, torch.cat([gt_idx, rois], 1))], 1)
        bf = conv(bf, 'roi_head.compress_feat', padding=1)
        pooled = bf.mean((-2, -1)).view(top_n, n, 256).mean(0)
        code = F.linear(torch.cat([W('roi_head.cls_embedding.weight')[labels], pooled], -1), W('roi_head.compress.weight'), W('roi_head.compress.bias'))
        params = F.linear(code, W(f'roi_head.generate_params.{stage}.weight'), W(f'roi_head.generate_params.{stage}.bias'))
        bf = F.conv2d(bf.view(top_n, n * 256, 7, 7), params.view(n * 256, 256, 1, 1), groups=n).view(top_n * n, 256, 7, 7)
        bf = F.relu(F.group_norm(bf, 32, W('roi_head.group_norm.weight'), W('roi_head.group_norm.bias')))
        h = bf.flatten(1)
        for j in range(2): h = F.relu(F.linear(h, W(f'roi_head.bbox_head.{stage}.shared_fcs.{j}.weight'), W(f'roi_head.bbox_head.{stage}.shared_fcs.{j}.bias')))
        cls = F.linear(h, W(f'roi_head.bbox_head.{stage}.fc_cls.weight'), W(f'roi_head.bbox_head.{stage}.fc_cls.bias'))
        reg = F.linear(h, W(f'roi_head.bbox_head.{stage}.fc_reg.weight'), W(f'roi_head.bbox_head.{stage}.fc_reg.bias'))
        probs = probs + cls.softmax(-1)[:, :80] / 3
        rois = _delta2bbox(rois, reg, stds, (H_img, W_img))
    sc = probs.view(top_n, n, 80).gather(2, labels[None, :, None].expand(top_n, -1, 1))[..., 0]
    keep, per_gt = _select_first(rois.view(top_n, n, 4), sc, labels, 0.5, n)
    sel = [m[0] if m else keep[0] for m in per_gt]
    return P, props, rois[sel], sc.reshape(-1)[sel]


def test_official_outputs_equal_the_official_path_in_float64(official_sd, converted):
    "The converted model (timm R50 + torchvision FPN/RetinaNetHead + this module's head) = the official test path written out."
    _, sd = official_sd
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 32, 768, generator=g, dtype=D)                # P7 is 1×6: the same-class groups share no anchor
    points = torch.tensor([[60.3, 11.7], [700.1, 20.2], [400.4, 25.9]], dtype=D)   # (a shared anchor = a score tie, which
    labels = torch.tensor([5, 5, 17])                                   # the official NMS breaks by its sort order)
    P, props, ref_b, ref_s = official_reference(sd, x, points, labels, top_n=4)
    seen = {}
    converted.fpn.register_forward_hook(lambda m, i, o: seen.setdefault('P', o))
    converted.proposals = lambda *a: seen.setdefault('groups', type(converted).proposals(converted, *a))
    try:
        with torch.no_grad(): res = converted(x, [dict(points=points, labels=labels)])[0]
    finally: del converted.proposals
    for a, b in zip(seen['P'], P): assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)       # neck, P6 from C5
    gp, gv = seen['groups']
    assert gv[0].all() and torch.allclose(gp[0], props.transpose(0, 1), rtol=1e-9, atol=1e-9)   # RetinaHead groups
    assert torch.allclose(res['boxes'], ref_b, rtol=1e-9, atol=1e-7) and torch.allclose(res['scores'], ref_s, rtol=1e-9, atol=1e-12)
    assert torch.equal(res['labels'], labels)
    assert (ref_s > 0).all() and len(set(map(tuple, ref_b.tolist()))) == 3 and (gp[0][..., 2:] > gp[0][..., :2]).any(-1).all()
