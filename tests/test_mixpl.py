"Tests of xwlearn.detection.mixpl: the recall analysis against a naive loop, erasing and box coverage, Pseudo-Mixup and Pseudo-Mosaic move boxes with their pixels, the cache, repeat factors, the MixPL step and its errors."
import math
import pytest
import torch
from torch import nn
from xwlearn.detection.mixpl import (pseudo_recall, recall_table, frequency_groups, box_coverage, erase_patches, flip_h,
                                     resize_with_boxes, pseudo_mixup, pseudo_mosaic, mosaic_sizes, PseudoImageCache, MixPL,
                                     MixPLCallback, repeat_factors, repeat_indices, SIZE_BUCKETS)
from xwlearn.vision.semi import UnlabeledStream

torch.set_num_threads(1)

def _boxes(g, n, size=64.):
    lo = torch.rand(n, 2, generator=g, dtype=torch.float64) * size * 0.7
    return torch.cat([lo, lo + 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * size * 0.3], 1)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_recall_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    gts = [dict(boxes=_boxes(g, 6), labels=torch.randint(0, 3, (6,), generator=g)) for _ in range(5)]
    ps = [dict(boxes=torch.cat([t['boxes'][:4] + 2 * torch.randn(4, 4, generator=g, dtype=torch.float64), _boxes(g, 3)]),
               labels=torch.cat([t['labels'][:4], torch.randint(0, 3, (3,), generator=g)])) for t in gts]
    ps[0] = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))     # an image without pseudo boxes
    r = pseudo_recall(ps, gts, iou_thr=0.5)
    naive = []
    for p, t in zip(ps, gts):
        for gb, gl in zip(t['boxes'], t['labels']):
            ious = [float(_iou(pb, gb)) for pb, pl in zip(p['boxes'], p['labels']) if pl == gl]
            naive.append(any(v >= 0.5 for v in ious))
    assert r['hit'].tolist() == naive and not r['hit'][:6].any()
    tab = recall_table(r, frequency_groups(torch.bincount(torch.cat([t['labels'] for t in gts]), minlength=3)), area_scale=4.0)
    a = r['area'] * 4.0
    for name, lo, hi in SIZE_BUCKETS:
        m = (a >= lo) & (a < hi)
        assert tab['size'][name][1] == int(m.sum())
        if m.any(): assert math.isclose(tab['size'][name][0], r['hit'][m].double().mean().item())
    assert sum(n for _, n in tab['group'].values()) == len(r['hit'])

def _iou(a, b):
    iw = max(0., float(min(a[2], b[2]) - max(a[0], b[0]))); ih = max(0., float(min(a[3], b[3]) - max(a[1], b[1])))
    i = iw * ih
    return i / (float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - i)

def test_frequency_groups_and_errors():
    assert frequency_groups([5, 50, 1, 20, 3]) == {1: 'head', 3: 'head', 0: 'body', 4: 'tail', 2: 'tail'}
    with pytest.raises(ValueError, match="counts: expected at least 3 classes"): frequency_groups([1, 2])
    with pytest.raises(ValueError, match="pseudo, gts: expected one entry per image"): pseudo_recall([], [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0))])
    with pytest.raises(ValueError, match=r"gts\[0\]: expected a dict with 'boxes'"): pseudo_recall([dict(boxes=torch.zeros(0, 4), labels=[])], [dict(boxes=torch.zeros(0, 4))])
    with pytest.raises(TypeError, match="pseudo: expected a list"): pseudo_recall(torch.zeros(3), [])

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_erase_patches_and_coverage(seed):
    g = torch.Generator().manual_seed(seed)
    im = torch.rand(3, 30, 50, generator=g) + 0.1
    t = dict(boxes=_boxes(g, 8, 30.).float().round(), labels=torch.arange(8), scores=torch.rand(8, generator=g))
    out, t2, mask = erase_patches(im, t, g, n=(5, 15), ratio=(0.05, 0.4), cover_thr=0.5)
    assert torch.equal((out == 0).all(0), mask) and torch.equal(out[:, ~mask], im[:, ~mask])
    b = t['boxes'].long().clamp(min=0); b[:, [0, 2]] = b[:, [0, 2]].clamp(max=50); b[:, [1, 3]] = b[:, [1, 3]].clamp(max=30)
    cov = torch.tensor([mask[y0:y1, x0:x1].double().mean().item() if (y1 > y0 and x1 > x0) else 1.0 for x0, y0, x1, y1 in b.tolist()], dtype=torch.float64)
    torch.testing.assert_close(box_coverage(mask, t['boxes']), cov, rtol=0, atol=1e-12)
    assert t2['labels'].tolist() == torch.arange(8)[cov <= 0.5].tolist() and len(t2['scores']) == len(t2['labels'])
    with pytest.raises(ValueError, match=r"image: expected \(C, H, W\)"): erase_patches(im[0], t, g)

def _square(box, H, W, v=1.0):
    im = torch.zeros(1, H, W); x0, y0, x1, y1 = box; im[:, y0:y1, x0:x1] = v
    return im, dict(boxes=torch.tensor([box], dtype=torch.float32), labels=torch.tensor([1]))

def _frames(mask, box, margin=2):
    "The box frames the marked pixels: every pixel `margin` inside the box is marked, none lies more than 1 px outside it."
    x0, y0, x1, y1 = box
    inner = mask[0, math.ceil(y0) + margin:math.floor(y1) - margin, math.ceil(x0) + margin:math.floor(x1) - margin]
    ys, xs = mask[0].nonzero(as_tuple=True)
    return (len(xs) > 0 and bool(inner.all()) and xs.min() >= math.floor(x0) - 1 and xs.max() + 1 <= math.ceil(x1) + 1
            and ys.min() >= math.floor(y0) - 1 and ys.max() + 1 <= math.ceil(y1) + 1)

@pytest.mark.parametrize("seed", range(4))
def test_pseudo_mixup_moves_boxes_with_pixels(seed):
    g = torch.Generator().manual_seed(seed)
    a, ta = _square([4, 6, 20, 14], 32, 48)
    b, tb = _square([10, 2, 30, 22], 40, 40)            # a cached image of another shape: resized by min(32/40, 48/40) = 0.8
    m, tm = pseudo_mixup(a, ta, b, tb, g, p_flip=0.5)
    assert m.shape == (1, 32, 48) and tm['labels'].tolist() == [1, 1]
    assert math.isclose(m.sum().item(), 0.5 * a.sum().item() + 0.5 * resize_with_boxes(b, tb, (32, 32))[0].sum().item(), rel_tol=1e-5)
    x0, y0, x1, y1 = tm['boxes'][0].round().long().tolist(); assert (m[0, y0:y1, x0:x1] >= 0.5 - 1e-6).all()
    bb = tm['boxes'][1].tolist(); assert math.isclose(bb[2] - bb[0], 16.0, abs_tol=1e-4) and math.isclose(bb[3] - bb[1], 16.0, abs_tol=1e-4)
    inner = m[0, math.ceil(bb[1]) + 1:math.floor(bb[3]) - 1, math.ceil(bb[0]) + 1:math.floor(bb[2]) - 1]
    assert (inner >= 0.5 - 1e-5).all()
    fa, fta = flip_h(a, ta); assert torch.equal(fa[0, 6:14, 48 - 20:48 - 4], torch.ones(8, 16)) and fta['boxes'].tolist() == [[28., 6., 44., 14.]]

@pytest.mark.parametrize("seed", range(4))
def test_pseudo_mosaic_moves_boxes_with_pixels(seed):
    g = torch.Generator().manual_seed(seed)
    srcs = [_square(b, 40, 48) for b in ([2, 4, 20, 30], [10, 2, 44, 12], [0, 20, 48, 40], [16, 16, 24, 24])]
    sizes = mosaic_sizes((40, 48), g, (0.5, 1.0))
    assert all(20 <= h <= 40 and 24 <= w <= 48 for h, w in sizes)
    (h0, w0), (h1, w1), (h2, w2), (h3, w3) = sizes
    for i in range(4):                                   # only tile i has its square: the moved box must frame its pixels
        ims = [s[0] if j == i else torch.zeros_like(s[0]) for j, s in enumerate(srcs)]
        mo, tm = pseudo_mosaic(ims, [s[1] for s in srcs], sizes)
        assert mo.shape == (1, max(h0, h1) + max(h2, h3), max(w0, w2) + max(w1, w3)) and len(tm['boxes']) == 4
        assert _frames(mo > 0.5, tm['boxes'][i].tolist()), (seed, i)

def test_cache_and_errors():
    c = PseudoImageCache(4)
    with pytest.raises(ValueError, match="k: expected at most 0"): c.sample(1)
    for i in range(7): c.push([torch.full((1, 2, 2), float(i))], [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), step=3)])
    assert [int(x[0][0, 0, 0]) for x in c.items] == [3, 4, 5, 6] and 'step' not in c.items[0][1]
    with pytest.raises(ValueError, match="images, targets, sizes: expected 4 of each"): pseudo_mosaic([torch.zeros(1, 4, 4)], [{}], [(2, 2)])
    with pytest.raises(ValueError, match=r"size: expected a positive \(h, w\)"): resize_with_boxes(torch.zeros(1, 4, 4), dict(boxes=torch.zeros(0, 4)), (0, 3))

def test_repeat_factors_and_indices():
    labs = [[0, 1], [0], [0], [0, 0], [2], [0], [1], [0], [0], [0]]
    r = repeat_factors(labs, thr=0.4)
    f = {0: 0.8, 1: 0.2, 2: 0.1}
    ref = [max(max(1.0, math.sqrt(0.4 / f[c])) for c in set(l)) for l in labs]
    torch.testing.assert_close(r, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    n = torch.zeros(10, dtype=torch.float64)
    for s in range(300): n += torch.bincount(torch.tensor(repeat_indices(r, torch.Generator().manual_seed(s))), minlength=10)
    torch.testing.assert_close(n / 300, r, rtol=0, atol=0.08)
    assert repeat_factors([[], [1]], thr=0.1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="labels: expected at least one labelled image"): repeat_factors([])

class _Stub(nn.Module):
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(())); self.seen = []
    def forward(self, images, targets=None):
        if not self.training: return [dict(boxes=torch.tensor([[8., 8., 24., 24.]]), scores=torch.tensor([.9]), labels=torch.tensor([1])) for _ in images]
        self.seen.append([(tuple(im.shape[-2:]), len(t['boxes'])) for im, t in zip(images, targets)])
        return dict(loss=self.w * sum(im.mean() for im in images))

@pytest.mark.parametrize("mixup,mosaic", [(True, True), (True, False), (False, True)])
def test_mixpl_step(mixup, mosaic):
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 32, 32, generator=g), {}) for _ in range(6)]
    s = _Stub()
    mp = MixPL(s, UnlabeledStream(data, bs=2, seed=0), cache_size=4, mixup=mixup, mosaic=mosaic, erase=False, decay=0.9)
    for _ in range(3):
        l = mp.loss(s); l.backward(); mp.update(s)
    calls = 1 + 1 + 1 + int(mosaic)                        # steps 1-2 plain; step 3: main (mixup or plain) + mosaic
    assert len(s.seen) == calls and mp.history['mixed'] == [False, False, True]
    assert [n for _, n in s.seen[2]] == ([2, 2] if mixup else [1, 1])
    if mosaic: assert all(n == 4 and 32 <= sh[0] <= 64 for sh, n in s.seen[3])
    assert mp.teacher is not s and len(mp.cache) == 6
    with pytest.raises(ValueError, match="unlabeled: expected a view named 'weak'"):
        from xwlearn.vision.transforms import MultiView
        MixPL(s, UnlabeledStream(data, views=MultiView(dict(a={}))))

def test_callback_builds_mixpl():
    data = [(torch.rand(3, 16, 16), {}) for _ in range(4)]
    cb = MixPLCallback(UnlabeledStream(data, bs=2), cache_size=4, mosaic_weight=0.25, decay=0.99)
    class L: model = _Stub()
    cb.learn = L(); cb.before_fit()
    assert isinstance(cb.mt, MixPL) and cb.mt.mosaic_weight == 0.25 and cb.mt.decay == 0.99 and cb.learn.mean_teacher is cb.mt

# --- official checkpoints ------------------------------------------------------------------------------------
import json
import torch.nn.functional as F
from pathlib import Path
from xwlearn.detection.mixpl import convert_official_mixpl, official_faster_rcnn

MANIFEST = json.loads((Path(__file__).parent/'fixtures'/'mixpl_faster_rcnn_keys.json').read_text())['keys']

@pytest.fixture(scope='module')
def official():
    "A random float64 checkpoint in the official layout (teacher random, student left uninitialised) and our model loaded from it."
    g = torch.Generator().manual_seed(0); sd = {}
    for k, s in MANIFEST.items():
        if k.endswith('num_batches_tracked'): sd[k] = torch.tensor(0)
        elif k.startswith('student.'): sd[k] = torch.empty(s, dtype=torch.float64)
        elif k.endswith('running_var'): sd[k] = 0.5 + torch.rand(s, generator=g, dtype=torch.float64)
        elif len(s) > 1: sd[k] = torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(math.prod(s[1:]))
        else: sd[k] = 0.1 * torch.randn(s, generator=g, dtype=torch.float64)
    with torch.device('meta'): det = official_faster_rcnn()                     # no init cost: the weights are assigned
    det.load_state_dict(convert_official_mixpl(dict(state_dict=sd), 'teacher'), strict=True, assign=True)
    det.eval()
    return sd, det

def test_manifest_converts_and_loads_strictly_both_branches(official):
    sd, det = official
    ours = det.state_dict()
    for branch in ('teacher', 'student'):
        out = convert_official_mixpl(sd, branch)
        n = sum(k.startswith(branch + '.') and not k.endswith('num_batches_tracked') for k in MANIFEST)
        assert len(out) == n and set(out) == set(ours)
        for k, v in out.items(): assert v.shape == ours[k].shape and v.dtype == ours[k].dtype, k
    assert torch.equal(det.rpn.head.cls_logits.weight, sd['teacher.rpn_head.rpn_cls.weight'])
    assert torch.equal(det.backbone.fpn.layer_blocks[3][0].bias, sd['teacher.neck.fpn_convs.3.conv.bias'])

# A direct transcription of the official arithmetic (mmdet 3 caffe-style ResNet Bottleneck, FPN, RPNHead, Shared2FCBBoxHead) on the official keys
def _bn(sd, x, p): return F.batch_norm(x, sd[p + '.running_mean'], sd[p + '.running_var'], sd[p + '.weight'], sd[p + '.bias'], False, 0., 1e-5)

def _block(sd, x, p, stride):
    o = F.relu(_bn(sd, F.conv2d(x, sd[p + '.conv1.weight'], stride=stride), p + '.bn1'))          # caffe: stride on the 1×1
    o = F.relu(_bn(sd, F.conv2d(o, sd[p + '.conv2.weight'], padding=1), p + '.bn2'))
    o = _bn(sd, F.conv2d(o, sd[p + '.conv3.weight']), p + '.bn3')
    idt = _bn(sd, F.conv2d(x, sd[p + '.downsample.0.weight'], stride=stride), p + '.downsample.1') if p + '.downsample.0.weight' in sd else x
    return F.relu(o + idt)

def _official_features(sd, img_rgb, P='teacher.'):
    x = img_rgb.flip(0)[None] * 255 - torch.tensor([103.53, 116.28, 123.675], dtype=torch.float64)[:, None, None]   # BGR, caffe mean, std 1
    x = F.max_pool2d(F.relu(_bn(sd, F.conv2d(x, sd[P + 'backbone.conv1.weight'], stride=2, padding=3), P + 'backbone.bn1')), 3, 2, 1)
    cs = []
    for i, n in enumerate((3, 4, 6, 3)):
        for j in range(n): x = _block(sd, x, f'{P}backbone.layer{i + 1}.{j}', 2 if j == 0 and i > 0 else 1)
        cs.append(x)
    lat = [F.conv2d(c, sd[f'{P}neck.lateral_convs.{i}.conv.weight'], sd[f'{P}neck.lateral_convs.{i}.conv.bias']) for i, c in enumerate(cs)]
    for i in range(3, 0, -1): lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode='nearest')
    outs = [F.conv2d(l, sd[f'{P}neck.fpn_convs.{i}.conv.weight'], sd[f'{P}neck.fpn_convs.{i}.conv.bias'], padding=1) for i, l in enumerate(lat)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]

def test_backbone_fpn_rpn_head_equal_official_arithmetic_float64(official):
    sd, det = official
    img = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _official_features(sd, img)
    ours = list(det.backbone(det.transform.normalize(img)[None]).values())
    assert len(ours) == len(ref) == 5
    for a, b in zip(ours, ref): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    obj, deltas = det.rpn.head(ours)
    P = 'teacher.rpn_head.'
    for f, o, d in zip(ref, obj, deltas):
        h = F.relu(F.conv2d(f, sd[P + 'rpn_conv.weight'], sd[P + 'rpn_conv.bias'], padding=1))
        torch.testing.assert_close(o, F.conv2d(h, sd[P + 'rpn_cls.weight'], sd[P + 'rpn_cls.bias']), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(d, F.conv2d(h, sd[P + 'rpn_reg.weight'], sd[P + 'rpn_reg.bias']), rtol=1e-10, atol=1e-10)

def test_box_head_equals_official_with_background_moved(official):
    sd, det = official
    x = torch.randn(7, 256, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    P = 'teacher.roi_head.bbox_head.'
    h = F.relu(F.linear(F.relu(F.linear(x.flatten(1), sd[P + 'shared_fcs.0.weight'], sd[P + 'shared_fcs.0.bias'])), sd[P + 'shared_fcs.1.weight'], sd[P + 'shared_fcs.1.bias']))
    cls, reg = F.linear(h, sd[P + 'fc_cls.weight'], sd[P + 'fc_cls.bias']), F.linear(h, sd[P + 'fc_reg.weight'], sd[P + 'fc_reg.bias'])
    logits, deltas = det.roi_heads.box_predictor(det.roi_heads.box_head(x))
    torch.testing.assert_close(logits[:, 0], cls[:, 80], rtol=1e-10, atol=1e-10)          # background: last there, first here
    torch.testing.assert_close(logits[:, 1:], cls[:, :80], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(deltas[:, 4:], reg, rtol=1e-10, atol=1e-10)
    assert (deltas[:, :4] == 0).all()
    torch.testing.assert_close(logits.softmax(1)[:, 1:], cls.softmax(1)[:, :80], rtol=1e-10, atol=1e-10)

def test_converter_errors():
    with pytest.raises(ValueError, match="branch: expected"): convert_official_mixpl({}, 'ema')
    with pytest.raises(ValueError, match="expected keys starting with 'teacher.'"): convert_official_mixpl({'model.x': torch.zeros(1)})
    with pytest.raises(ValueError, match="1 keys have no counterpart"): convert_official_mixpl({'teacher.roi_head.mask_head.x': torch.zeros(1)})
