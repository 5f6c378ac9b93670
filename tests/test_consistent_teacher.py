"Tests of xwlearn.detection.consistent_teacher: ASA against a naive cost, FAM-3D's resampling and its reduction to the plain head, the detector's losses and errors, the Consistent-Teacher filter."
import pytest
import torch
from torch import nn
from xwlearn.detection.consistent_teacher import (asa_cost, asa_assign, iou_assign, deform_resample, FAM3DHead,
                                                  ConsistentTeacherDetector, consistent_teacher_filter)
from xwlearn.vision.layers import level_points

torch.set_num_threads(1)

def _naive_cost(probs, boxes, points, strides, gt_boxes, gt_labels, iou_factor):
    from torchvision.ops import box_iou
    import torch.nn.functional as F
    C = torch.zeros(len(points), len(gt_boxes), dtype=probs.dtype)
    for i in range(len(points)):
        for j in range(len(gt_boxes)):
            p, y = probs[i], F.one_hot(gt_labels[j], probs.shape[1]).to(probs.dtype)
            cls = (F.binary_cross_entropy(p, y, reduction='none') * (0.25 * y + 0.75 * (1 - y)) * ((1 - p) * y + p * (1 - y)) ** 2).sum()
            ctr = (gt_boxes[j, :2] + gt_boxes[j, 2:]) / 2
            C[i, j] = cls - iou_factor * torch.log(box_iou(boxes[i:i + 1], gt_boxes[j:j + 1])[0, 0] + 1e-7) + 10 ** (torch.linalg.norm(points[i] - ctr) / strides[i] - 3)
    return C

def _problem(seed, N=50, M=4, K=5):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(N, K, generator=g, dtype=torch.float64)
    pts = torch.rand(N, 2, generator=g, dtype=torch.float64) * 64
    sts = torch.tensor([8., 16.], dtype=torch.float64)[torch.randint(0, 2, (N,), generator=g)]
    bx = torch.cat([pts - 4 - 8 * torch.rand(N, 2, generator=g, dtype=torch.float64), pts + 4 + 8 * torch.rand(N, 2, generator=g, dtype=torch.float64)], 1)
    lo = torch.rand(M, 2, generator=g, dtype=torch.float64) * 40
    gt = torch.cat([lo, lo + 8 + 20 * torch.rand(M, 2, generator=g, dtype=torch.float64)], 1)
    return probs, bx, pts, sts, gt, torch.randint(0, K, (M,), generator=g)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asa_cost_and_assignment(seed):
    probs, bx, pts, sts, gt, lab = _problem(seed)
    C, I = asa_cost(probs, bx, pts, sts, gt, lab, iou_factor=2.0)
    torch.testing.assert_close(C, _naive_cost(probs, bx, pts, sts, gt, lab, 2.0), rtol=1e-10, atol=1e-10)
    a, w = asa_assign(probs, bx, pts, sts, gt, lab, topk=13, iou_factor=2.0)
    inside = ((pts[:, None] > gt[None, :, :2]).all(-1) & (pts[:, None] < gt[None, :, 2:]).all(-1)).any(1)
    assert (a[~inside] == -1).all()
    fg = a >= 0
    torch.testing.assert_close(w[fg], I[fg.nonzero()[:, 0], a[fg]])
    assert (w[~fg] == 0).all()
    # each box's positives are its cheapest candidates not taken by a cheaper box: no unmatched candidate is cheaper for it
    for j in range(len(gt)):
        mine = a == j
        if mine.any():
            free = inside & (a == -1)
            assert not (C[free, j] < C[mine, j].max() - 1e-12).any() or mine.sum() == 0

def test_asa_empty_and_iou_assign():
    pts, sts = level_points([(4, 4)], [8])
    a, w = asa_assign(torch.rand(16, 3), torch.rand(16, 4), pts, sts, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (a == -1).all() and (w == 0).all()
    anchors = torch.cat([pts - 8, pts + 8], 1)
    a, w = iou_assign(anchors, anchors[5:6])
    assert a[5] == 0 and w[5] == 1.0 and set(a.tolist()) <= {-2, -1, 0}

def test_deform_resample_matches_bilinear():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64); off = 2 * torch.randn(2, 8, 6, 5, generator=g, dtype=torch.float64)
    H, W = 6, 5
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype), torch.arange(W, dtype=x.dtype), indexing='ij')
    ref = torch.cat([F.grid_sample(x[:, c:c + 1], torch.stack([2 * (xs + off[:, 2 * c + 1]) / (W - 1) - 1, 2 * (ys + off[:, 2 * c]) / (H - 1) - 1], -1),
                                   align_corners=True) for c in range(4)], 1)
    torch.testing.assert_close(deform_resample(x, off), ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(deform_resample(x, torch.zeros_like(off)), x)
    with pytest.raises(ValueError, match="offset: expected shape"): deform_resample(x, off[:, :2])

@pytest.mark.parametrize("box", ["delta", "ltrb"])
def test_fam3d_with_zero_offsets_and_weights_is_the_plain_head(box):
    torch.manual_seed(0)
    h, plain = FAM3DHead(32, 3, [8, 16, 32], n_convs=2, box=box), FAM3DHead(32, 3, [8, 16, 32], n_convs=2, fam3d=False, box=box)
    missing = plain.load_state_dict(h.state_dict(), strict=False)
    assert not missing.missing_keys and set(missing.unexpected_keys) == {k for k in h.state_dict() if k.split('.')[0] in ('mapping', 'reg_offset', 'level_weight')}
    for m in (h.reg_offset, h.level_weight): nn.init.zeros_(m.weight); nn.init.zeros_(m.bias)
    feats = [torch.randn(2, 32, s, s) for s in (8, 4, 2)]
    o, o0 = h(feats), plain(feats)
    assert torch.equal(o['box'], o0['box']) and torch.equal(o['cls'], o0['cls'])
    # non-zero scale weights change the boxes, and gradients reach the FAM-3D convs
    nn.init.constant_(h.level_weight.bias, 0.3)
    o = h(feats); assert not torch.allclose(o['box'], o0['box'])
    o['box'].sum().backward(); assert h.level_weight.weight.grad.abs().sum() > 0 and h.reg_offset.weight.grad.abs().sum() > 0
    assert (o['level_weights'][0] >= 0).all() and (o['level_weights'][-1] <= 0).all()

def _scenes(n, seed=0):
    from xwlearn.vision.scenes import make_scenes
    sc = make_scenes(n, size=64, seed=seed, scale=(0.12, 0.25), max_objects=3, p_stuff=0.0)
    ims = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in sc.images]
    return ims, [dict(boxes=torch.as_tensor(sc.target(i)['boxes'], dtype=torch.float32), labels=torch.as_tensor(sc.target(i)['labels'])) for i in range(n)], len(sc.classes)

def test_detector_learns_and_beats_its_start():
    "After 30 steps on 4 scenes the detector finds the training objects far better than at initialisation (IoU ≥ 0.5 recall among its top boxes)."
    from torchvision.ops import box_iou
    ims, tg, K = _scenes(4)
    def recall(det):
        det.eval()
        with torch.no_grad(): d = det(ims)
        det.train(); hit = tot = 0
        for di, t in zip(d, tg):
            for b, l in zip(t['boxes'], t['labels']):
                m = di['labels'] == l; tot += 1
                hit += int(m.any() and box_iou(b[None], di['boxes'][m][:5]).max() >= 0.5)
        return hit / tot
    torch.manual_seed(0)
    det = ConsistentTeacherDetector(K + 1, width=32, n_convs=2, anchor_scale=4., score_thr=0.0)
    r0 = recall(det); opt = torch.optim.AdamW(det.parameters(), 3e-3)
    for _ in range(30):
        loss = sum(det(ims, tg).values()); opt.zero_grad(); loss.backward(); opt.step()
    assert recall(det) >= r0 + 0.3, (r0, recall(det))

def test_detector_errors_and_images_of_different_sizes():
    det = ConsistentTeacherDetector(4, width=16, n_convs=1, anchor_scale=4.)
    with pytest.raises(ValueError, match="labels'\\]: expected values in 1..3"): det([torch.rand(3, 64, 64)], [dict(boxes=torch.tensor([[0., 0, 9, 9]]), labels=torch.tensor([4]))])
    with pytest.raises(ValueError, match="targets: expected one dict"): det([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match="assigner: expected"): ConsistentTeacherDetector(4, assigner='atss')
    l = det([torch.rand(3, 64, 48), torch.rand(3, 40, 64)], [dict(boxes=torch.tensor([[2., 2, 20, 20]]), labels=torch.tensor([1])),
                                                             dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))])
    assert set(l) == {'cls', 'box'} and all(torch.isfinite(v) for v in l.values())

def test_filter_chain():
    f = consistent_teacher_filter(3, n_scores=100)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):  # scores with two modes: the GMM threshold settles between them
        s = torch.cat([0.2 * torch.rand(6, generator=g), 0.8 + 0.1 * torch.rand(3, generator=g)])
        out = f([dict(boxes=torch.zeros(9, 4), scores=s, labels=torch.ones(9, dtype=torch.long))])
    thr = float(f.filters[1].thr[1])
    assert 0.2 < thr <= 0.9, thr
    assert (out[0]['scores'] >= thr).all()

# --- official checkpoints ------------------------------------------------------------------------------------
import json
from pathlib import Path
from xwlearn.detection.consistent_teacher import convert_official_consistent_teacher, official_detector

MANIFEST = json.loads((Path(__file__).parent/'fixtures'/'consistent_teacher_official_keys.json').read_text())

@pytest.fixture(scope='module')
def official_model():
    return official_detector()

@pytest.mark.parametrize("branch", ["teacher", "student"])
def test_manifest_converts_one_to_one_and_loads_strictly(official_model, branch):
    "A random checkpoint in the official layout (the manifest's keys and shapes) converts key for key and loads strictly; values land where named."
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) if s else torch.randn((), generator=g) for k, s in MANIFEST['keys'].items()}
    for k, s in MANIFEST['keys'].items():
        if k.endswith('num_batches_tracked'): sd[k] = torch.tensor(0)
    out, gmm = convert_official_consistent_teacher(dict(state_dict=sd), branch)
    n_branch = sum(k.startswith(branch + '.') for k in MANIFEST['keys'])
    assert len(out) == n_branch
    ours = official_model.state_dict()
    assert set(out) == set(ours), (sorted(set(ours) - set(out))[:5], sorted(set(out) - set(ours))[:5])
    for k, v in out.items(): assert v.shape == ours[k].shape, k
    official_model.load_state_dict(out, strict=True)
    assert torch.equal(official_model.head.cls_out.weight, sd[f'{branch}.bbox_head.tood_cls.weight'])
    assert torch.equal(official_model.backbone.fpn.extra_blocks.p7.weight, sd[f'{branch}.neck.fpn_convs.4.conv.weight'])
    assert torch.equal(official_model.head.level_weight.bias, sd[f'{branch}.bbox_head.pyramid_offset.bias'])
    assert gmm.shape == (81, 100) and (gmm[0] == 0).all() and torch.equal(gmm[1:], sd['scores'])

def test_converter_errors():
    with pytest.raises(ValueError, match="branch: expected"): convert_official_consistent_teacher({}, 'ema')
    with pytest.raises(ValueError, match="expected keys starting with 'teacher.'"): convert_official_consistent_teacher({'model.x': torch.zeros(1)})
    with pytest.raises(ValueError, match="1 keys have no counterpart"): convert_official_consistent_teacher({'teacher.bbox_head.atss_centerness.weight': torch.zeros(1)})
