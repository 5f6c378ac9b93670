"""Vision evaluation (`xwlearn.vision.evaluation`): every COCO statistic equals pycocotools run by hand on the original
annotation json and the mapped-back predictions (ground truth through the real loader: resize, non-contiguous category
ids, masks, crowd, empty images); the old evaluator's three bugs as regressions; segmentation, cluster matching, AR@K
and point->box metrics against naive references."""
import itertools, json
import numpy as np
import pytest, torch
from torch.nn import functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from xwlearn.vision.detection import write_coco_shapes, coco_dataset
from xwlearn.vision.evaluation import (COCO_STATS, CocoEvaluator, coco_evaluate, coco_results, to_original, confusion_matrix,
                                       segmentation_scores, match_clusters, cluster_scores, proposal_recall, point_box_scores,
                                       IOU_THRESHOLDS)

torch.set_num_threads(1)
CATS = [1, 3, 90]


@pytest.fixture(scope='module')
def split(tmp_path_factory):
    "A val split with ids 1, 3, 90, mixed image sizes, one image without objects, two crowd regions (with RLE masks)."
    root = write_coco_shapes(tmp_path_factory.mktemp('coco'), n_train=1, n_val=8, size=[(48, 64), (64, 40), (56, 56), (40, 72)],
                             seed=5, classes=('circle', 'square', 'triangle'), category_ids=CATS)
    ann = root/'annotations/instances_val2017.json'; js = json.loads(ann.read_text())
    js['annotations'] = [a for a in js['annotations'] if a['image_id'] != js['images'][1]['id']]
    for k, im in enumerate(js['images'][2:4]):
        m = np.zeros((im['height'], im['width']), np.uint8); m[:18, -18:] = 1
        rle = mask_utils.encode(np.asfortranarray(m)); rle['counts'] = rle['counts'].decode()
        js['annotations'].append(dict(id=90000 + k, image_id=im['id'], category_id=CATS[k], bbox=[im['width'] - 18, 0, 18, 18],
                                      area=324, iscrowd=1, segmentation=rle))
    ann.write_text(json.dumps(js))
    ds = coco_dataset(root, 'val2017', size=80, max_size=100, masks=True)
    return ann, ds, [ds[i][1] for i in range(len(ds))]


def reference(ann, ds, dets, targets, iou_type):
    "pycocotools on the json file; detections mapped back by hand (numpy, per axis), masks bilinear + 0.5."
    gt = COCO(str(ann)); res = []
    for d, t in zip(dets, targets):
        (H, W), (h, w) = t['orig_size'].tolist(), t['size'].tolist()
        b = d['boxes'].double().numpy() * np.array([W / w, H / h, W / w, H / h])
        for k in range(len(b)):
            r = dict(image_id=int(t['image_id']), category_id=CATS[int(d['labels'][k]) - 1], score=float(d['scores'][k]))
            if iou_type == 'bbox': r['bbox'] = [b[k, 0], b[k, 1], b[k, 2] - b[k, 0], b[k, 3] - b[k, 1]]
            else:
                m = F.interpolate(d['masks'][k][None, None].float(), size=(H, W), mode='bilinear', align_corners=False)[0, 0] > 0.5
                r['segmentation'] = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            res.append(r)
    if not res: return None
    e = COCOeval(gt, gt.loadRes(res), iou_type); e.evaluate(); e.accumulate(); e.summarize()
    return {k: float(v) if v >= 0 else float('nan') for k, v in zip(COCO_STATS, e.stats)}


def same(a, b, eps=0.):
    x, y = np.array([a[k] for k in COCO_STATS]), np.array([b[k] for k in COCO_STATS])
    return np.array_equal(np.isnan(x), np.isnan(y)) and np.all(np.abs(np.nan_to_num(x - y)) <= eps)


def perturb(targets, kind, seed=0):
    g = torch.Generator().manual_seed(seed); out = []
    for t in targets:
        b, l, m = t['boxes'].clone(), t['labels'].clone(), t['masks'].clone().float()
        s = torch.rand(len(b), generator=g) * 0.9 + 0.1
        if kind == 'drop':
            keep = torch.rand(len(b), generator=g) > 0.4; b, l, m, s = b[keep], l[keep], m[keep], s[keep]
        elif kind == 'jitter':
            sh = torch.randint(-4, 5, (len(b), 2), generator=g)
            b = b + sh.repeat(1, 2); m = torch.stack([torch.roll(x, (int(dy), int(dx)), (0, 1)) for x, (dx, dy) in zip(m, sh)]) if len(m) else m
        elif kind == 'duplicate':
            b, l, m, s = torch.cat([b, b + 1]), torch.cat([l, l]), torch.cat([m, m]), torch.cat([s, s * 0.9])
        elif kind == 'wrong_class':
            w = torch.rand(len(l), generator=g) < 0.5; l[w] = l[w] % 3 + 1
        elif kind == 'crowd_hits':       # extra confident detections on the crowd regions (ignored by COCO's rules)
            cm = torch.zeros(len(t['crowd_boxes']), *m.shape[-2:])
            for k, (x0, y0, x1, y1) in enumerate(t['crowd_boxes'].round().long().tolist()): cm[k, y0:y1, x0:x1] = 1
            b, l, m = torch.cat([b, t['crowd_boxes']]), torch.cat([l, t['crowd_labels']]), torch.cat([m, cm])
            s = torch.cat([s, torch.ones(len(t['crowd_boxes']))])
        elif kind == 'empty_images':     # no detection at all on every other image
            if int(t['image_id']) % 2: b, l, m, s = b[:0], l[:0], m[:0], s[:0]
        out.append(dict(boxes=b, labels=l, masks=m, scores=s))
    return out


@pytest.mark.parametrize('kind', ['drop', 'jitter', 'duplicate', 'wrong_class', 'crowd_hits', 'empty_images'])
def test_equals_pycocotools_on_the_original_json(split, kind):
    ann, ds, tg = split
    dets = perturb(tg, kind)
    ev = CocoEvaluator(ann, ('bbox', 'segm'), ds.label_to_cat)
    for k in range(0, len(tg), 3): ev.update(dets[k:k + 3], tg[k:k + 3])      # in batches, as a loader gives them
    ours = ev.compute()
    for t in ('bbox', 'segm'):
        ref = reference(ann, ds, dets, tg, t)
        assert same(ours[t], ref), (kind, t, ours[t], ref)
    if kind in ('drop', 'wrong_class', 'empty_images', 'jitter'): assert ours['bbox']['AP'] < 1


def test_faster_coco_eval_agrees(split):
    ann, ds, tg = split
    dets = perturb(tg, 'jitter', seed=3)
    a = CocoEvaluator(ann, ('bbox', 'segm'), ds.label_to_cat); a.update(dets, tg)
    b = CocoEvaluator(ann, ('bbox', 'segm'), ds.label_to_cat, backend='faster_coco_eval'); b.update(dets, tg)
    ra, rb = a.compute(), b.compute()
    for t in ('bbox', 'segm'): assert same(ra[t], rb[t], eps=1e-12), (t, ra[t], rb[t])


def test_label_map_and_targets(split):
    ann, ds, tg = split
    js = json.loads(ann.read_text())
    assert ds.label_to_cat.tolist() == [0] + CATS and ds.num_classes == 4
    t = tg[0]; im = js['images'][0]
    assert t['orig_size'].tolist() == [im['height'], im['width']] and t['size'].tolist() != t['orig_size'].tolist()
    src = sorted((a['category_id'], a['bbox'][0]) for a in js['annotations'] if a['image_id'] == im['id'] and not a['iscrowd'])
    got = sorted((CATS[int(l) - 1], round(float(b[0]) * im['width'] / t['size'][1].item(), 3)) for l, b in zip(t['labels'], t['boxes']))
    assert [c for c, _ in src] == [c for c, _ in got] and np.allclose([x for _, x in src], [x for _, x in got], atol=1e-3)


# --- the old evaluator's three bugs --------------------------------------------------------------------------------

def test_crowd_box_is_ignored(split):
    ann, ds, tg = split
    dets = perturb(tg, 'crowd_hits')
    for d, t in zip(dets, tg): d['scores'][:len(t['boxes'])] = 1.0              # perfect boxes + hits on crowd regions
    ev = CocoEvaluator(ann, 'bbox', ds.label_to_cat); ev.update(dets, tg)
    assert ev.compute()['bbox']['AP'] == 1.0 == reference(ann, ds, dets, tg, 'bbox')['AP']


def test_half_the_images_perfect_is_not_one(split):
    ann, ds, tg = split
    dets = [dict(boxes=t['boxes'], labels=t['labels'], scores=torch.ones(len(t['boxes'])), masks=t['masks'])
            if k % 2 == 0 else dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0), masks=torch.zeros(0, *t['masks'].shape[-2:]))
            for k, t in enumerate(tg)]
    ev = CocoEvaluator(ann, 'bbox', ds.label_to_cat); ev.update(dets, tg)
    r, ref = ev.compute()['bbox'], reference(ann, ds, dets, tg, 'bbox')
    assert same(r, ref) and 0.2 < r['AP'] < 0.8
    # a loader over a subset scores the images it holds: image 0 (perfect) and image 1 (no objects, no detections)
    assert len(tg[1]['boxes']) == 0 and len(tg[0]['boxes']) > 0
    sub = CocoEvaluator(ann, 'bbox', ds.label_to_cat, img_ids=[int(t['image_id']) for t in tg[:2]]); sub.update(dets[:2], tg[:2])
    assert np.isclose(sub.compute()['bbox']['AP'], 1.0, atol=1e-12)


def test_small_objects_stay_small_at_800px(split):
    ann, _, _ = split
    big = coco_dataset(ann.parent.parent, 'val2017', size=800, max_size=1333)
    tb = [big[i][1] for i in range(len(big))]
    assert max(t['size'].min().item() for t in tb) == 800
    wh = torch.cat([t['boxes'][:, 2:] - t['boxes'][:, :2] for t in tb])
    assert ((wh[:, 0] * wh[:, 1]) > 96 ** 2).double().mean() > 0.5     # most objects are 'large' in the loaded images
    ev = CocoEvaluator(ann, 'bbox', big.label_to_cat)
    ev.update([dict(boxes=t['boxes'], labels=t['labels'], scores=torch.ones(len(t['boxes']))) for t in tb], tb)
    r = ev.compute()['bbox']
    assert r['APs'] == 1.0 and np.isnan(r['APl']) and np.isnan(r['APm'])


def test_no_detections_and_errors(split):
    ann, ds, tg = split
    r = coco_evaluate(ann, [])
    assert r['AP'] == 0 and r['AR100'] == 0 and np.isnan(r['APl'])
    with pytest.raises(ValueError, match="backend must be one of"): coco_evaluate(ann, [], backend='x')
    with pytest.raises(ValueError, match="iou_types must be a non-empty subset"): CocoEvaluator(ann, ('keypoints',))
    with pytest.raises(ValueError, match="detections and targets must pair up"): coco_results([{}], [])
    with pytest.raises(KeyError, match="target needs 'size'"): to_original(dict(boxes=torch.zeros(0, 4)), dict(image_id=1, orig_size=(2, 2)))
    with pytest.raises(FileNotFoundError, match="gt: annotation file"): coco_evaluate(ann.parent/'nope.json', [])


def test_missing_backend_names_the_extra(split, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'faster_coco_eval', None)        # as if not installed
    with pytest.raises(ImportError, match=r'the .detection. extra: pip install "xwlearn\[detection\]"'):
        coco_evaluate(split[0], [], backend='faster_coco_eval')


# --- segmentation, clusters, proposals, points --------------------------------------------------------------------

def test_segmentation_scores_vs_loops():
    r = np.random.default_rng(1)
    t = r.integers(0, 5, (2, 11, 9)); t[0, :2] = 255; p = np.where(r.random(t.shape) < 0.5, t, r.integers(0, 5, t.shape)) % 5
    p[p == 4] = 0; t[t == 4] = 0
    s = segmentation_scores(confusion_matrix(torch.tensor(p), torch.tensor(t), 5))
    pairs = [(a, b) for a, b in zip(p.ravel(), t.ravel()) if b != 255]
    ious = [sum(a == c and b == c for a, b in pairs) / u for c in range(5) if (u := sum(a == c or b == c for a, b in pairs))]
    accs = [sum(a == c for a, b in pairs if b == c) / n for c in range(5) if (n := sum(b == c for _, b in pairs))]
    assert np.isclose(s['mIoU'], np.mean(ious), atol=1e-12) and np.isclose(s['pixel_acc'], np.mean([a == b for a, b in pairs]), atol=1e-12)
    assert np.isclose(s['mean_acc'], np.mean(accs), atol=1e-12) and np.isnan(s['iou'][4])
    with pytest.raises(ValueError, match='target values must lie in 0..4'): confusion_matrix(torch.tensor([0]), torch.tensor([7]), 5)


@pytest.mark.parametrize('k', [2, 3, 4, 5])
def test_hungarian_matches_brute_force(k):
    r = np.random.default_rng(k)
    t = r.integers(0, k, (25, 20)); p = np.where(r.random(t.shape) < 0.4, r.permutation(k)[t], r.integers(0, k, t.shape))
    conf = confusion_matrix(torch.tensor(p), torch.tensor(t), k).numpy()
    best = max(itertools.permutations(range(k)), key=lambda q: sum(conf[q[j], j] for j in range(k)))
    m = match_clusters(conf)
    assert sum(conf[m[j], j] for j in range(k)) == sum(conf[best[j], j] for j in range(k))
    cs = cluster_scores(torch.tensor(p), torch.tensor(t), k)
    assert np.isclose(cs['pixel_acc'], (np.array(best)[p] == t).mean(), atol=1e-12)


def test_extra_clusters_count_as_wrong():
    t = torch.tensor([0, 0, 1, 1, 1, 1]); p = torch.tensor([0, 2, 1, 1, 3, 1])   # 4 clusters, 2 classes
    cs = cluster_scores(p, t, 2, n_clusters=4)
    assert cs['clusters_to_classes'].tolist() == [0, 1, -1, -1] and np.isclose(cs['pixel_acc'], 4 / 6)
    assert np.isclose(cs['mIoU'], (1 / 2 + 3 / 4) / 2)


def naive_iou(a, b):
    iw, ih = max(0., min(a[2], b[2]) - max(a[0], b[0])), max(0., min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)


def boxes(r, n):
    xy = r.uniform(0, 80, (n, 2)); return np.concatenate([xy, xy + r.uniform(4, 40, (n, 2))], 1)


def test_proposal_recall_vs_loops():
    r = np.random.default_rng(7)
    gts = [boxes(r, n) for n in (4, 1, 0, 6)]
    props = [np.concatenate([g + r.normal(0, 5, g.shape), boxes(r, 20)])[r.permutation(len(g) + 20)] for g in gts]
    out = proposal_recall(props, gts, ks=(1, 3, 10, 100))
    for k in (1, 3, 10, 100):
        best = [max([naive_iou(g, p) for p in ps[:k]], default=0.) for ps, gs in zip(props, gts) for g in gs]
        assert np.isclose(out[f'AR@{k}'], np.mean([[b >= t for t in IOU_THRESHOLDS] for b in best]), atol=1e-12)
        assert np.isclose(out[f'R50@{k}'], np.mean([b >= 0.5 for b in best]), atol=1e-12)
    assert out['AR@1'] <= out['AR@3'] <= out['AR@10'] <= out['AR@100']


def test_point_box_scores_vs_loops():
    r = np.random.default_rng(8)
    g = boxes(r, 30); p = g + r.normal(0, 5, g.shape); p[[2, 9]] = np.nan
    s = point_box_scores(p, g)
    ref = [0. if np.isnan(a).any() else naive_iou(a, b) for a, b in zip(p, g)]
    assert np.isclose(s['mIoU'], np.mean(ref), atol=1e-12) and np.isclose(s['recall'], np.mean([x >= 0.5 for x in ref]), atol=1e-12)
    with pytest.raises(ValueError, match='one row per point'): point_box_scores(p[:2], g)
