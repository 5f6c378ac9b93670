"""Vision layers (`xwlearn.vision.layers`): each piece against a loop written from its definition, gradcheck, errors, EMA resume, a tiny FCOS fit."""
import itertools, math, subprocess, sys
import pytest, torch
from torch import nn
from torchvision.ops import box_iou, sigmoid_focal_loss
from xwlearn.vision.layers import (TinyBackbone, BackboneFPN, DenseHead, level_points, distance2box, box2distance,
                                   max_iou_assign, hungarian_assign, dynamic_k_assign, centers_in_boxes, fcos_assign,
                                   quality_focal_loss, quality_target, nms, fcos_losses, dense_detect)
from xwlearn.nets import ModelEMA, ema_   # the one EMA helper (re-exported by vision.layers)

torch.set_num_threads(1)


def rand_boxes(n, g, span=50., lo=5., extra=20.):
    xy = torch.rand(n, 2, generator=g) * span
    return torch.cat([xy, xy + lo + torch.rand(n, 2, generator=g) * extra], 1)


def test_light_imports():
    code = ("import sys, xwlearn.vision.layers, xwlearn.vision.detr\n"
            "bad = [m for m in ('fastai.learner', 'matplotlib', 'pycocotools') if m in sys.modules]\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_pyramid_and_head_order():
    fpn = BackboneFPN(TinyBackbone(), 16, p6p7=True)
    feats = fpn(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    head = DenseHead(16, 2, fpn.strides)
    out = head(feats)
    pts, sts = level_points(out["sizes"], fpn.strides)
    assert out["cls"].shape[1] == len(pts) == len(sts)
    i = 96 + 24 + 1 * 2 + 1  # level 2 (3×2), row 1, column 1
    assert torch.allclose(out["quality"][0, i], head.quality_out(head.box_tower(feats[2]))[0, :, 1, 1])
    assert torch.equal(pts[i], torch.tensor([1.5 * 32, 1.5 * 32]))
    with pytest.raises(ValueError, match="feats"): head(feats[:2])
    with pytest.raises(ValueError, match="box"): DenseHead(16, 2, [8], box="xyxy")


def test_distance_round_trip():
    g = torch.Generator().manual_seed(0)
    pts, b = torch.rand(20, 2, generator=g) * 40, rand_boxes(20, g)
    assert torch.allclose(distance2box(pts, box2distance(pts, b)), b)


def test_max_iou_matches_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        ious = box_iou(rand_boxes(25, g), rand_boxes(3, g))
        for lq in (False, True):
            got = max_iou_assign(ious, .5, .4, lq)
            v, j = ious.max(1)
            exp = torch.where(v >= .5, j, torch.where(v < .4, -1, -2))
            if lq:
                best = (ious == ious.max(0).values).any(1) & (v > 0)
                exp = torch.where(best, j, exp)
            assert torch.equal(got, exp)
    far = box_iou(rand_boxes(10, g), torch.tensor([[900., 900., 910., 910.]]))
    assert (max_iou_assign(far) >= 0).sum() == 0  # torchvision's Matcher alone would make all 10 positive
    assert torch.equal(max_iou_assign(torch.zeros(4, 0)), torch.full((4,), -1))
    with pytest.raises(ValueError, match="ious"): max_iou_assign(torch.zeros(4))


@pytest.mark.parametrize("n,m,k", [(4, 2, 1), (3, 3, 1), (2, 3, 1), (5, 2, 2), (4, 2, 3)])
def test_hungarian_is_brute_force_minimum(n, m, k):
    cost = torch.rand(n, m, generator=torch.Generator().manual_seed(n * 10 + m + k), dtype=torch.float64)
    pi, gi = hungarian_assign(cost, k)
    c = cost.repeat(1, k)
    if n <= m * k: best = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m * k), n))
    else: best = min(sum(c[p[j], j] for j in range(m * k)) for p in itertools.permutations(range(n), m * k))
    assert abs(cost[pi, gi].sum().item() - float(best)) < 1e-9
    assert len(set(pi.tolist())) == len(pi) == min(n, m * k) and torch.bincount(gi, minlength=m).max() <= k


def test_hungarian_errors_and_empty():
    assert [len(t) for t in hungarian_assign(torch.zeros(3, 0))] == [0, 0]
    with pytest.raises(ValueError, match="cost"): hungarian_assign(torch.tensor([[float("inf")]]))
    with pytest.raises(ValueError, match="k"): hungarian_assign(torch.zeros(2, 2), k=0)


def test_dynamic_k_matches_loop():
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        cost, ious = torch.rand(30, 4, generator=g), torch.rand(30, 4, generator=g) * .7
        valid = torch.rand(30, 4, generator=g) > .4
        got = dynamic_k_assign(cost, ious, valid, topk=6)
        chosen = {i: [] for i in range(30)}
        for j in range(4):
            cand = [i for i in range(30) if valid[i, j]]
            k = min(max(1, int(sum(sorted((ious[i, j].item() for i in cand), reverse=True)[:6]))), len(cand))
            for i in sorted(cand, key=lambda i: cost[i, j].item())[:k]: chosen[i].append(j)
        exp = [-1 if not c else c[0] if len(c) == 1 else min((j for j in range(4) if valid[i, j]), key=lambda j: cost[i, j].item())
               for i, c in chosen.items()]
        assert got.tolist() == exp
    with pytest.raises(ValueError, match="cost and ious"): dynamic_k_assign(torch.zeros(3, 2), torch.zeros(3, 3))


def test_fcos_assign_smallest_box_in_range():
    pts, sts = level_points([(8, 8), (4, 4), (2, 2)], [8, 16, 32])
    boxes = torch.tensor([[0., 0., 60., 60.], [10., 10., 30., 30.], [10., 10., 22., 22.]])
    a = fcos_assign(pts, sts, boxes, center_radius=None)
    for p, s, j in zip(pts.tolist(), sts.tolist(), a.tolist()):
        ok = []
        for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            d = [p[0] - x1, p[1] - y1, x2 - p[0], y2 - p[1]]
            lo, hi = {8: (0, 32), 16: (32, 64), 32: (64, math.inf)}[int(s)]
            if min(d) > 0 and lo <= max(d) < hi: ok.append(((x2 - x1) * (y2 - y1), k))
        assert j == (min(ok)[1] if ok else -1)
    assert (a == 2).any() and (a == 0).any()
    assert torch.equal(centers_in_boxes(torch.tensor([[1., 1.]]), torch.tensor([[0., 0., 2., 2.]]), radius=.5), torch.tensor([[True]]))


def test_quality_focal_loss():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = quality_target(torch.tensor([0, -1, 2, 1, -1]), torch.rand(5, dtype=torch.float64, generator=g), 3)
    assert y[1].abs().sum() == 0 and y[0, 1:].abs().sum() == 0 and 0 < y[0, 0] < 1
    p = x.sigmoid()
    naive = -(y - p).abs() ** 2 * ((1 - y) * torch.log(1 - p) + y * torch.log(p))
    assert torch.allclose(quality_focal_loss(x, y), naive)
    assert torch.autograd.gradcheck(lambda a, b: quality_focal_loss(a, b, reduction="mean"), (x, y.clone().requires_grad_()))
    hard = (torch.rand(5, 3, generator=g) > .5).double()
    assert torch.allclose(quality_focal_loss(x, hard), 2 * sigmoid_focal_loss(x, hard, alpha=.5, gamma=2))
    with pytest.raises(ValueError, match="reduction"): quality_focal_loss(x, y, reduction="avg")


def test_nms_matches_greedy():
    g = torch.Generator().manual_seed(3)
    boxes, scores, cls = rand_boxes(30, g, 30, 5, 15), torch.rand(30, generator=g), torch.randint(0, 2, (30,), generator=g)
    for idx in (cls, None):
        keep = []
        for i in scores.argsort(descending=True).tolist():
            same = [j for j in keep if idx is None or idx[j] == idx[i]]
            if all(box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= .5 for j in same): keep.append(i)
        assert nms(boxes, scores, idx, .5).tolist() == keep


def test_model_ema_recurrence_and_resume():
    def steps(net, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            with torch.no_grad():
                for p in net.parameters(): p.add_(torch.randn(p.shape, generator=g))
            net.train(); net(torch.randn(4, 3, generator=g)); yield

    def run(split):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)); e = ModelEMA(net, decay=.95, use_warmup=True)
        for i, _ in enumerate(steps(net, 5, 1)):
            e.update(net)
            if split and i == 1:
                st = e.state_dict(); e = ModelEMA(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), decay=.95, use_warmup=True)
                e.load_state_dict(st)
        return e
    a, b = run(False), run(True)
    assert int(b.n_updates) == 5
    for v, w in zip(a.state_dict().values(), b.state_dict().values()): assert torch.allclose(v, w)
    torch.manual_seed(0)
    net = nn.Linear(3, 2); e = ModelEMA(net, decay=.9); ref = net.weight.detach().clone()
    for _ in steps(net, 3, 2):
        e.update(net); ref = .9 * ref + .1 * net.weight.detach()
    assert torch.allclose(e.module.weight, ref)
    assert torch.equal(ema_(torch.zeros(2), torch.ones(2), .5), torch.full((2,), .5))
    with pytest.raises(ValueError, match="momentum"): ema_(torch.zeros(2), torch.ones(2), 1.5)


def test_tiny_fcos_fits():
    g = torch.Generator().manual_seed(0)
    imgs, targets = .5 + .1 * torch.randn(4, 3, 64, 64, generator=g), []
    for im in imgs:
        boxes = rand_boxes(2, g, 30, 12, 20).round(); labels = torch.randint(0, 2, (2,), generator=g)
        for (x1, y1, x2, y2), c in zip(boxes.int().tolist(), labels.tolist()): im[c, y1:y2, x1:x2] = 1.
        targets.append(dict(boxes=boxes, labels=labels))
    torch.manual_seed(0)
    fpn = BackboneFPN(TinyBackbone(widths=(16, 16, 32, 32, 32)), 32); head = DenseHead(32, 2, fpn.strides, n_convs=1)
    opt = torch.optim.AdamW([*fpn.parameters(), *head.parameters()], lr=3e-3)
    pts, sts = level_points([(8, 8), (4, 4), (2, 2)], fpn.strides)
    losses = []
    for _ in range(60):
        out = head(fpn(imgs)); loss = sum(fcos_losses(out, pts, sts, targets).values())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 2.5, (losses[0], losses[-5:])
    d = dense_detect(out["cls"][0].detach(), distance2box(pts, out["box"][0].detach()), out["quality"][0].detach(), max_det=7)
    assert set(d) == {"boxes", "scores", "labels"} and len(d["boxes"]) <= 7 and (d["scores"][:-1] >= d["scores"][1:]).all()
    with pytest.raises(ValueError, match="targets"): fcos_losses(out, pts, sts, targets[:1])
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))] * 4
    le = fcos_losses(head(fpn(imgs)), pts, sts, empty)
    assert le["box"] == 0 and le["quality"] == 0 and le["cls"] > 0
    sum(le.values()).backward()  # an image without boxes still trains the classifier


def test_mmdet_extra_levels_float64():
    import torch.nn.functional as F
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from xwlearn.vision.layers import ExtraP6P7
    torch.manual_seed(0)
    bb = TinyBackbone(widths=(8, 8, 16, 16, 24)).double()
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    cs = bb(x)
    for src in ("c5", "p5"):
        m = BackboneFPN(bb, 8, p6p7=src).double()
        ps = m(x)
        assert [tuple(f.shape[-2:]) for f in ps] == [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)] and m.strides == [8, 16, 32, 64, 128]
        w6, b6, w7, b7 = (t.detach() for t in (m.fpn.extra_blocks.p6.weight, m.fpn.extra_blocks.p6.bias, m.fpn.extra_blocks.p7.weight, m.fpn.extra_blocks.p7.bias))
        p6 = F.conv2d(cs[-1] if src == "c5" else ps[2], w6, b6, stride=2, padding=1)
        assert torch.allclose(ps[3], p6, atol=1e-12) and torch.allclose(ps[4], F.conv2d(p6, w7, b7, stride=2, padding=1), atol=1e-12)
        assert m.fpn.extra_blocks.p6.in_channels == (24 if src == "c5" else 8)
    relu = ExtraP6P7(8, 8, "p5", relu=True).double(); relu.load_state_dict(m.fpn.extra_blocks.state_dict())
    p, _ = relu(list(ps[:3]), list(cs), ["0", "1", "2"])
    assert torch.allclose(p[4], F.conv2d(F.relu(p[3]), w7, b7, stride=2, padding=1), atol=1e-12) and not torch.allclose(p[4], ps[4])
    mp = BackboneFPN(bb, 8, extra_blocks=LastLevelMaxPool()).double()
    out = mp(x)
    assert mp.strides == [8, 16, 32, 64] and torch.equal(out[3], F.max_pool2d(out[2], 1, 2, 0))
    with pytest.raises(ValueError, match="p6p7"): BackboneFPN(bb, 8, p6p7="c6")
    with pytest.raises(ValueError, match="extra_blocks"): BackboneFPN(bb, 8, p6p7="c5", extra_blocks=LastLevelMaxPool())
    with pytest.raises(TypeError, match="extra_blocks"): BackboneFPN(bb, 8, extra_blocks=nn.Identity())
    with pytest.raises(ValueError, match="in_channels"): ExtraP6P7(16, 8, "p5")
    with pytest.raises(ValueError, match="source"): ExtraP6P7(16, 8, "p4")
