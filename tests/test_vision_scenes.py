"""Scene generator (`xwlearn.vision.scenes`): determinism, the visibility limit checked against each object repainted alone,
every label from the same draw, expressions resolved from their words, clips, homographies checked by mapping pixels."""
import time
import numpy as np
import pytest, torch
from scipy.ndimage import binary_erosion
from xwlearn.vision.scenes import (make_scenes, make_clips, make_homography_pairs, object_masks, captions, referring_expressions,
                                   resolve_expression, apply_homography, homography_from_points, STUFF_CLASSES)

torch.set_num_threads(1)
G = np.arange(64, dtype=np.float32) + 0.5
X, Y = np.broadcast_to(G[None], (64, 64)), np.broadcast_to(G[:, None], (64, 64))


def alone(sc):
    "Each object's own mask, painted alone (independent of the generator's bookkeeping)."
    o = sc.objects
    return object_masks(o['label'], o['cx'], o['cy'], o['r'], o['theta'], X, Y, sc.classes)


@pytest.fixture(scope='module')
def crowded():
    return make_scenes(150, seed=3, max_objects=7, crowding=0.9, max_occlusion=0.15, distractors=2, p_empty=0.1, n_points=3)


def test_deterministic():
    a, b, c = make_scenes(30, seed=4), make_scenes(30, seed=4), make_scenes(30, seed=5)
    assert (a.images == b.images).all() and (a.semantic == b.semantic).all() and (a.objects['box'] == b.objects['box']).all()
    assert (a.images != c.images).any()


@pytest.mark.parametrize('limit', [0.0, 0.15, 0.4])
def test_no_object_hidden_beyond_the_limit(limit):
    sc = make_scenes(120, seed=7, max_objects=7, crowding=1.0, max_occlusion=limit)
    m = alone(sc); o = sc.objects
    vis = np.array([(sc.instances[o['image'][j]][m[j]] == o['slot'][j] + 1).mean() for j in range(len(m))])
    assert vis.min() >= 1 - limit - 1e-9, (limit, vis.min())
    np.testing.assert_allclose(vis, o['visible'])
    if limit > 0: assert vis.min() < 1          # the limit is reached, not avoided by never overlapping
    else:                                        # no overlap at all: the masks of an image are disjoint
        for i in range(len(sc)):
            s, e = sc.offsets[i], sc.offsets[i + 1]; assert m[s:e].sum(0).max(initial=0) <= 1


def test_labels_from_the_same_draw(crowded):
    sc = crowded; o = sc.objects; K = len(sc.classes)
    assert (np.diff(sc.offsets) == 0).sum() > 5
    for i in range(len(sc)):
        t = sc.target(i)
        for b, m, p, l in zip(t['boxes'], t['masks'], t['points'], t['labels']):
            ys, xs = np.nonzero(m)
            np.testing.assert_array_equal(b, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            q = np.floor(p).astype(int); assert m[q[:, 1], q[:, 0]].all() and len({tuple(x) for x in q}) == len(q)
            assert (sc.semantic[i][m] == l).all()
        things = sc.semantic[i] <= K
        assert ((sc.instances[i] > 0) == (things & (sc.semantic[i] > 0))).all()      # things exactly where instances are
        assert set(np.nonzero(sc.tags[i])[0] + 1) == set(t['labels'].tolist())
    assert sc.semantic.max() <= K + len(STUFF_CLASSES)


def test_long_tail_and_knobs():
    sc = make_scenes(250, seed=0, long_tail=1.5, min_objects=3, max_objects=3)
    f = np.bincount(sc.objects['label'], minlength=5)
    assert f[0] > 2 * f[2] > 0 and f[2] > f[4]
    for kw in (dict(n=0), dict(n=4, p_empty=1.0)):                 # nothing to place: empty labels, not errors
        e = make_scenes(**kw); assert len(e.objects['image']) == 0 and e.tags.shape == (kw['n'], 5) and (e.instances == 0).all()
    d = make_scenes(40, seed=1, distractors=3, p_stuff=0)             # distractors are painted but never labelled
    assert (d.semantic[d.instances == 0] == 0).all() and d.offsets[-1] == len(d.objects['image'])
    for bad, match in ((dict(max_occlusion=1.5), 'max_occlusion'), (dict(scale=(0.3, 0.6)), 'scale'),
                       (dict(classes=('circle', 'hexagon')), 'classes'), (dict(n_points=20), 'n_points')):
        with pytest.raises(ValueError, match=match): make_scenes(2, **bad)


def test_expressions_pick_out_their_object(crowded):
    n = 0
    for i in range(len(crowded)):
        for r in referring_expressions(crowded, i):
            assert resolve_expression(crowded, i, r['sentence']) == [r['object']]; n += 1
            assert crowded.classes[crowded.objects['label'][r['object']]] in r['sentence']
        cap = captions(crowded, i)
        assert all(crowded.classes[k] in cap[1] for k in np.nonzero(crowded.tags[i])[0])
    assert n > 150


def test_clips():
    cl = make_clips(8, T=6, seed=1, motion='bounce', p_degrade=0.5, max_objects=3)
    o, T = cl.frames.objects, cl.T
    for c in range(len(cl)):
        ids = cl.track[(o['image'] // T) == c]; assert len(set(ids.tolist())) * T == len(ids)   # one entry per track and frame
    d = cl.degradations; assert d['blur'].shape == (8, 6) and (d['blur'] > 0).any() and (d['contrast'] < 1).any()
    for c, t in np.argwhere(d['bar'][..., 0] >= 0):
        x0, y0, x1, y1 = d['bar'][c, t].astype(int); assert (cl.frames.instances[c * T + t, y0:y1, x0:x1] == 0).all()
    # bouncing: positions stay inside and move by the speed per frame (up to reflections)
    assert (o['cy'] >= o['r'] - 1e-6).all() and (o['cy'] <= 64 - o['r'] + 1e-6).all()
    lin = make_clips(5, T=12, seed=2, motion='linear', speed=(4, 5), p_degrade=0)
    lo = lin.frames.objects; k = lin.track == lin.track[0]
    v = np.diff(np.stack([lo['cx'][k], lo['cy'][k]], 1), axis=0); assert np.allclose(v, v[0]) and 4 - 1e-6 <= np.hypot(*v[0]) <= 5 + 1e-6
    assert (lo['area'] == 0).any()
    with pytest.raises(ValueError, match='motion'): make_clips(1, motion='zigzag')


def test_homographies_map_points():
    hp = make_homography_pairs(5, views=4, seed=3)
    src = np.array([[0, 0], [64, 0], [64, 64], [0, 64]], float); dst = src + np.random.default_rng(0).uniform(-9, 9, (4, 2))
    np.testing.assert_allclose(apply_homography(homography_from_points(src, dst), src), dst, atol=1e-9)
    def agree(H, i, k):
        inst0 = hp.instances[i, 0]; inner = np.zeros_like(inst0, bool)
        for j in np.unique(inst0[inst0 > 0]): inner |= binary_erosion(inst0 == j, iterations=2)
        ys, xs = np.nonzero(inner); q = np.floor(apply_homography(H, np.stack([xs + .5, ys + .5], 1))).astype(int)
        ok = (q >= 0).all(1) & (q < 64).all(1)
        return (hp.instances[i, k][q[ok, 1], q[ok, 0]] == inst0[ys[ok], xs[ok]]).mean() if ok.sum() else np.nan
    good = [agree(hp.H[i, k], i, k) for i in range(5) for k in range(1, 4)]
    assert np.isfinite(good).sum() >= 10 and np.nanmin(good) == 1.0
    assert np.nanmean([agree(np.linalg.inv(hp.H[i, k]), i, k) for i in range(5) for k in range(1, 4)]) < 0.9
    il = make_homography_pairs(2, views=3, kind='illumination', seed=1)
    assert (il.H == np.eye(3)).all() and (il.instances[:, 1] == il.instances[:, 0]).all()


def test_speed_is_reported():
    make_scenes(10)
    t = time.perf_counter(); sc = make_scenes(500, seed=9); dt = time.perf_counter() - t
    print(f"make_scenes: {len(sc) / dt:.0f} scenes/s (64 px, 1 thread, shared machine)")
    assert len(sc) == 500
