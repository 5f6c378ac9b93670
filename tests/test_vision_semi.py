"Tests of xwlearn.vision.semi: the GMM against scikit-learn, the filters, box transfer between views, the cache, and a mean teacher inside `Learner.fit` that resumes exactly."
import math
import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from xwlearn.vision.semi import (gmm_1d, gmm_log_prob, gmm_threshold, ScoreThreshold, TopSumScore, GMMThreshold, Chain,
                                 PseudoLabelCache, UnlabeledStream, transfer_boxes, MeanTeacher, MeanTeacherCallback)
from xwlearn.vision.transforms import MultiView, apply_view

torch.set_num_threads(1)

def _sklearn(x):
    return GaussianMixture(2, weights_init=[.5, .5], means_init=[[float(x.min())], [float(x.max())]],
                           precisions_init=[[[1.]], [[1.]]]).fit(x[:, None].numpy())

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gmm_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    n1, n2 = int(torch.randint(5, 80, (), generator=g)), int(torch.randint(5, 80, (), generator=g))
    x = torch.cat([0.05 + 0.2 * torch.rand(n1, generator=g), 0.5 + 0.15 * torch.randn(n2, generator=g).abs()]).double()
    r, sk = gmm_1d(x, torch.stack([x.min(), x.max()])), _sklearn(x)
    torch.testing.assert_close(r['means'], torch.from_numpy(sk.means_.ravel()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r['vars'], torch.from_numpy(sk.covariances_.ravel()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r['weights'], torch.from_numpy(sk.weights_), rtol=1e-9, atol=1e-12)
    assert r['n_iter'] == sk.n_iter_
    lp = gmm_log_prob(x, r)
    np.testing.assert_allclose(lp.logsumexp(1).numpy(), sk.score_samples(x[:, None].numpy()), rtol=1e-9)
    np.testing.assert_array_equal(lp.argmax(1).numpy(), sk.predict(x[:, None].numpy()))

def test_gmm_threshold_matches_the_official_policy_written_with_sklearn():
    g = torch.Generator().manual_seed(5)
    x = torch.cat([0.1 * torch.rand(70, generator=g), 0.7 + 0.05 * torch.randn(30, generator=g)]).double()
    sk = _sklearn(x); a = sk.predict(x[:, None].numpy()); ll = sk.score_samples(x[:, None].numpy()); ll[a == 0] = -np.inf
    best = x.numpy()[np.argmax(ll)]
    ref = x.numpy()[(a == 1) & (x.numpy() >= best)].min()
    assert gmm_threshold(x) == pytest.approx(ref)
    assert 0.5 < gmm_threshold(x) < 0.8  # between the modes' bulk: the high mode's typical score
    assert gmm_threshold(x[:3], default=0.3) == 0.3  # fewer than 4 scores: the default

def test_gmm_bad_input():
    with pytest.raises(ValueError, match="x: expected at least 2"): gmm_1d(torch.ones(1), (0., 1.))
    with pytest.raises(ValueError, match="means, weights, precisions"): gmm_1d(torch.rand(5), (0., .5, 1.))

def _dets():
    return [dict(boxes=torch.tensor([[0., 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]), scores=torch.tensor([.9, .4, .2]), labels=torch.tensor([1, 2, 1])),
            dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))]

def test_filters():
    d = ScoreThreshold(0.3)(_dets())
    assert d[0]['scores'].tolist() == pytest.approx([.9, .4]) and len(d[1]['boxes']) == 0
    assert len(TopSumScore()(_dets())[0]['scores']) == 2          # round(1.5) = 2
    assert len(TopSumScore(extra=1)(_dets())[0]['scores']) == 3   # the official code keeps one more
    f = GMMThreshold(3)
    out = f(_dets())                                               # < 4 scores per class: default 0 keeps all
    assert len(out[0]['scores']) == 3 and f.scores[1, :2].tolist() == pytest.approx([.9, .2])
    f2 = GMMThreshold(3); f2.load_state_dict(f.state_dict()); assert torch.equal(f2.scores, f.scores)
    c = Chain(TopSumScore(), ScoreThreshold(.5)); assert c(_dets())[0]['scores'].tolist() == pytest.approx([.9])
    with pytest.raises(ValueError, match=r"thr: expected a score in \[0, 1\]"): ScoreThreshold(2.)
    with pytest.raises(ValueError, match="dets\\[0\\]: expected keys"): ScoreThreshold()([dict(boxes=torch.zeros(0, 4))])
    with pytest.raises(TypeError, match="dets: expected a list"): ScoreThreshold()(torch.zeros(3))
    with pytest.raises(ValueError, match="labels: expected values in"): GMMThreshold(2).update(torch.rand(2), torch.tensor([0, 5]))

def test_gmm_filter_fifo_keeps_the_newest_scores():
    f = GMMThreshold(2, n_scores=5)
    for k in range(4): f.update(torch.full((2,), 0.1 * (k + 1)), torch.tensor([1, 1]))
    assert f.scores[1].tolist() == pytest.approx([.4, .4, .3, .3, .2])  # newest first, oldest dropped

def test_transfer_boxes_is_the_same_geometric_transform():
    "Boxes drawn in the weak view and moved with the matrices land where the strong view's own transform puts the same boxes."
    g = torch.Generator().manual_seed(0)
    im = torch.rand(3, 48, 64, generator=g)
    boxes = torch.tensor([[10., 8, 30, 20], [40, 20, 60, 44]])
    mv = MultiView(dict(weak=dict(flip=0.5), strong=dict(flip=0.5, scale=(0.7, 1.3), translate=0.1)), seed=3)
    from torchvision import tv_tensors
    t = dict(boxes=tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(48, 64)))
    for _ in range(5):
        v = mv(tv_tensors.Image(im), t)
        moved = transfer_boxes(dict(boxes=v['weak'][1]['boxes'].as_subclass(torch.Tensor), scores=torch.ones(2), labels=torch.ones(2, dtype=torch.long)),
                               v['weak'][2], v['strong'][2], (48, 64), min_size=0.)
        torch.testing.assert_close(moved['boxes'], v['strong'][1]['boxes'].as_subclass(torch.Tensor), atol=1e-3, rtol=0)
    out = transfer_boxes(dict(boxes=torch.tensor([[-20., -20, -5, -5], [0, 0, 10, 10]]), labels=torch.tensor([1, 2])),
                         torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), (48, 64))
    assert out['labels'].tolist() == [2]  # the box outside the image is dropped with its label

def test_cache():
    c = PseudoLabelCache(capacity=2)
    for i in range(3): c.put(i, dict(boxes=torch.zeros(i, 4), scores=torch.zeros(i), labels=torch.zeros(i, dtype=torch.long)), step=i)
    assert 0 not in c and len(c) == 2 and c.get(2)['step'] == 2 and c.boxes_per_image() == 1.5
    c2 = PseudoLabelCache(); c2.load_state_dict(c.state_dict()); assert list(c2.items) == [1, 2]

# --- a mean teacher inside Learner.fit --------------------------------------------------------------------
def _scene_items(n, seed, size=32):
    from xwlearn.vision.scenes import make_scenes
    sc = make_scenes(n, size=size, seed=seed, scale=(0.15, 0.3), max_objects=2, p_stuff=0.0)
    return [(torch.from_numpy(sc.images[i]).permute(2, 0, 1).float() / 255,
             dict(boxes=torch.as_tensor(sc.target(i)['boxes'], dtype=torch.float32), labels=torch.as_tensor(sc.target(i)['labels']),
                  image_id=i)) for i in range(n)]

def _learner(out_dir, extra_cbs=()):
    from xwlearn.data import SeededDL
    from xwlearn.vision.detection import DetectionDataLoaders, detection_collate, detection_learner, tiny_fcos
    from xwlearn.recipes import CheckpointCallback
    from fastai.optimizer import Adam
    torch.manual_seed(0)
    lab, unl = _scene_items(8, 0), _scene_items(8, 1)
    dls = DetectionDataLoaders(SeededDL(lab, bs=4, shuffle=True, seed=0, create_batch=detection_collate),
                               SeededDL(lab[:4], bs=4, create_batch=detection_collate), device='cpu')
    det = tiny_fcos(num_classes=8, width=16, size=32)
    mt = MeanTeacherCallback(UnlabeledStream(unl, bs=2, seed=0), filter=Chain(TopSumScore(extra=1), GMMThreshold(8)),
                             decay=0.9, weight=1.0, warmup=1)
    ck = CheckpointCallback(out_dir)
    learn = detection_learner(dls, det, opt_func=Adam, lr=1e-3, metrics=[], cbs=[mt, ck, *extra_cbs])
    return learn, mt, ck

def _weights(m): return {k: v.clone() for k, v in m.state_dict().items()}

def test_mean_teacher_resumes_exactly(tmp_path):
    from fastai.callback.core import Callback, CancelFitException
    from xwlearn.recipes import SkipFinishedEpochs
    learn, mt, _ = _learner(tmp_path/'a')
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    ref_student, ref_teacher, ref_hist = _weights(learn.model), _weights(mt.mt.teacher), mt.mt.history
    assert mt.mt.step == 6 and len(ref_hist['step']) == 5   # 2 steps per epoch; warm-up of 1 step
    assert any(not torch.equal(ref_teacher[k], ref_student[k]) for k in ref_student if ref_student[k].is_floating_point())

    class Stop(Callback):
        order = 100  # after the checkpoint is written
        def after_epoch(self):
            if self.epoch == 0: raise CancelFitException
    learn, mt, _ = _learner(tmp_path/'b', [Stop()])
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    learn, mt, ck = _learner(tmp_path/'b')
    start = ck.restore(learn); assert start == 1
    learn.add_cb(SkipFinishedEpochs(start))
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    for k, v in _weights(learn.model).items(): assert torch.equal(v, ref_student[k]), k
    for k, v in _weights(mt.mt.teacher).items(): assert torch.equal(v, ref_teacher[k]), k
    assert mt.mt.history == ref_hist and mt.mt.step == 6

def test_mean_teacher_bad_views():
    with pytest.raises(ValueError, match="unlabeled: expected a view named 'weak'"):
        MeanTeacher(torch.nn.Linear(2, 2), UnlabeledStream([(torch.zeros(3, 8, 8), {})], views=MultiView(dict(a={}, strong={}))))
    with pytest.raises(ValueError, match="dataset: expected at least one"): UnlabeledStream([])
