"""CPU benchmark: COCO evaluation with pycocotools (the reference) vs faster-coco-eval, same results, 1,000 images.

`python kernels/cpu_coco_eval.py [--images 1000] [--rounds 3] [--out kernels/results/cpu_coco_eval.json]`

A COCO-like split is made in memory (seeded): 1,000 images of 640x480, 7 objects per image on average over COCO's 80
non-contiguous category ids (1..90), 1 % crowd regions, each object with an elliptic RLE mask; the results are 100
detections per image (COCO's maxDets): every object found with probability 0.8 with a jittered box and mask, plus
false positives, random scores. Both backends score the same result list through
`xwlearn.vision.evaluation.coco_evaluate` (load the results, evaluate, accumulate, summarize), bbox and segm, in
alternating rounds so that drifts of a shared machine hit both alike; the median time of each and whether the 12
statistics agree (max |difference|) are printed and written as json. One process, one thread (`XWLEARN_THREADS=1`).
"""
import argparse, json, platform, statistics, time
from pathlib import Path
import numpy as np
from pycocotools import mask as mask_utils
from xwlearn.core import set_cpu_threads
from xwlearn.vision.evaluation import coco_evaluate, load_coco, COCO_STATS

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]   # COCO 2017's 80 ids


def ellipse_rle(x, y, w, h, W=640, H=480):
    "The RLE and pixel area of the ellipse inscribed in box [x, y, w, h] (rasterised in the box only)."
    x0, y0, x1, y1 = (int(np.clip(v, 0, m)) for v, m in ((np.floor(x), W), (np.floor(y), H), (np.ceil(x + w), W), (np.ceil(y + h), H)))
    yy, xx = np.ogrid[y0:y1, x0:x1]
    m = np.zeros((H, W), np.uint8, order='F')
    m[y0:y1, x0:x1] = (((xx + 0.5 - x - w / 2) / max(w / 2, 0.5)) ** 2 + ((yy + 0.5 - y - h / 2) / max(h / 2, 0.5)) ** 2) <= 1
    r = mask_utils.encode(m); r['counts'] = r['counts'].decode(); return r, int(m.sum())


def make(n_images, seed=0, W=640, H=480):
    r = np.random.default_rng(seed); images, anns, bbox_res, segm_res = [], [], [], []
    for i in range(1, n_images + 1):
        images.append(dict(id=i, width=W, height=H, file_name=f'{i:012d}.jpg'))
        objs = []
        for _ in range(r.poisson(7)):
            w, h = np.exp(r.uniform(np.log(6), np.log(300), 2)); x, y = r.uniform(0, W - w), r.uniform(0, H - h)
            c = int(r.choice(COCO_IDS)); seg, area = ellipse_rle(x, y, w, h)
            crowd = int(r.random() < 0.01)
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=c, bbox=[x, y, w, h], area=area, iscrowd=crowd, segmentation=seg))
            objs.append((x, y, w, h, c))
        dets = [(x + r.normal(0, 0.05 * w), y + r.normal(0, 0.05 * h), w * np.exp(r.normal(0, 0.1)), h * np.exp(r.normal(0, 0.1)), c)
                for x, y, w, h, c in objs if r.random() < 0.8]
        while len(dets) < 100:
            w, h = np.exp(r.uniform(np.log(6), np.log(300), 2)); dets.append((r.uniform(0, W - w), r.uniform(0, H - h), w, h, int(r.choice(COCO_IDS))))
        for x, y, w, h, c in dets:
            s = float(r.random()); bbox_res.append(dict(image_id=i, category_id=c, bbox=[x, y, w, h], score=s))
            segm_res.append(dict(image_id=i, category_id=c, segmentation=ellipse_rle(x, y, w, h)[0], score=s))
    gt = dict(info={}, images=images, annotations=anns, categories=[dict(id=c, name=str(c)) for c in COCO_IDS])
    return gt, bbox_res, segm_res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=1000); ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--out', type=Path, default=Path(__file__).parent/'results'/'cpu_coco_eval.json')
    a = ap.parse_args(argv); set_cpu_threads()
    t = time.perf_counter(); gt, bres, sres = make(a.images); t_make = time.perf_counter() - t
    print(f"{a.images} images, {len(gt['annotations'])} objects, {len(bres)} results per type (made in {t_make:.1f} s)")
    out = dict(images=a.images, objects=len(gt['annotations']), results=len(bres), rounds=a.rounds,
               machine=platform.processor() or platform.machine(), python=platform.python_version(), types={})
    for iou_type, res in (('bbox', bres), ('segm', sres)):
        times, stats = {b: [] for b in ('pycocotools', 'faster_coco_eval')}, {}
        for _ in range(a.rounds):
            for b in times:
                g = load_coco(gt, b)                                      # ground truth read outside the timing
                t = time.perf_counter(); stats[b] = coco_evaluate(g, res, iou_type, backend=b); times[b].append(time.perf_counter() - t)
        diff = max(abs(stats['pycocotools'][k] - stats['faster_coco_eval'][k]) for k in COCO_STATS if not np.isnan(stats['pycocotools'][k]))
        med = {b: statistics.median(v) for b, v in times.items()}
        out['types'][iou_type] = dict(seconds=med, all_seconds=times, speedup=med['pycocotools'] / med['faster_coco_eval'],
                                      max_abs_stat_difference=diff, AP=stats['pycocotools']['AP'])
        print(f"{iou_type}: pycocotools {med['pycocotools']:.2f} s, faster-coco-eval {med['faster_coco_eval']:.2f} s "
              f"(x{med['pycocotools'] / med['faster_coco_eval']:.1f}); AP {stats['pycocotools']['AP']:.4f}, max |stat difference| {diff:.1e}")
    a.out.parent.mkdir(parents=True, exist_ok=True); a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == '__main__': main()
