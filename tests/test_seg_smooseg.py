"SmooSeg (xwlearn.seg.smooseg, xwlearn.repro.smooseg): the pairwise energy against pair-by-pair loops in float64, gradient routing of the teacher–student prototypes, the EMA, learning on separable features, label maps, errors."
import itertools
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xwlearn.seg.smooseg import (feature_affinity, pair_energy, other_image, smoothness_loss, data_loss, Projector, Prototypes,
                                 SmooSeg, SmooSegLoss)
from xwlearn.repro.smooseg import stego_loss, cocostuff27_lut, cityscapes27_lut, COCOSTUFF27, calibrate_shift, fit_head, evaluate_head

torch.set_num_threads(1)
D = torch.float64

def _pairs(B, h, w, h2, w2):
    return itertools.product(range(B), range(h), range(w), range(h2), range(w2))

def _naive_S(f1, f2, pointwise):
    B, _, h, w = f1.shape; h2, w2 = f2.shape[-2:]
    S = torch.zeros(B, h, w, h2, w2, dtype=D)
    for n, i, j, k, l in _pairs(B, h, w, h2, w2): S[n, i, j, k, l] = F.cosine_similarity(f1[n, :, i, j], f2[n, :, k, l], dim=0)
    return S - S.mean((3, 4), keepdim=True) + S.mean() if pointwise else S

@pytest.mark.parametrize("shape2", [(3, 2), (2, 4)])
@pytest.mark.parametrize("pointwise", [False, True])
def test_affinity_matches_loop(shape2, pointwise):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 2, 3, generator=g, dtype=D), torch.randn(2, 5, *shape2, generator=g, dtype=D)
    torch.testing.assert_close(feature_affinity(f1, f2, pointwise), _naive_S(f1, f2, pointwise), rtol=0, atol=1e-12)

def test_smoothness_loss_matches_loop_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    f, p = torch.randn(3, 6, 2, 3, generator=g, dtype=D), torch.rand(3, 4, 2, 3, generator=g, dtype=D)
    perm = torch.tensor([2, 0, 1])
    def naive(S, p1, p2, b):
        return np.mean([(float(S[n, i, j, k, l]) - b) * (1 - float(F.cosine_similarity(p1[n, :, i, j], p2[n, :, k, l], dim=0)))
                        for n, i, j, k, l in _pairs(3, 2, 3, 2, 3)])
    out = smoothness_loss(f, p, -0.02, 0.48, perm=perm)
    assert abs(float(out['intra']) - naive(_naive_S(f, f, True), p, p, -0.02)) < 1e-12
    assert abs(float(out['inter']) - naive(_naive_S(f, f[perm], True), p, p[perm], 0.48)) < 1e-12
    assert torch.autograd.gradcheck(lambda q: smoothness_loss(f, q, -0.02, 0.48, perm=perm)['loss'], (p.clone().requires_grad_(),))
    # equal labels everywhere: no dissimilarity, zero energy whatever the affinities
    same = torch.ones(3, 4, 2, 3, dtype=D)
    assert float(smoothness_loss(f, same, 0.3, 0.5, perm=perm)['loss'].abs()) < 1e-12

def test_pair_energy_sign():
    "S above the shift: the step lowers the dissimilarity of the two labels; below it: raises it."
    pa, pb = torch.tensor([.7, .2, .1], dtype=D), torch.tensor([.2, .7, .1], dtype=D)
    for s, sign in ((0.9, -1), (0.1, 1)):
        x = pa.clone().requires_grad_()
        e, _ = pair_energy(torch.full((1, 1, 1, 1, 1), s, dtype=D), x[None, :, None, None], pb[None, :, None, None], 0.5)
        e.sum().backward()
        cd = lambda u: 1 - float(F.cosine_similarity(u, pb, dim=0))
        assert sign * (cd(pa - 0.1 * x.grad) - cd(pa)) > 0

def test_other_image_never_self():
    g = torch.Generator().manual_seed(0)
    for n in range(2, 9):
        for _ in range(20):
            p = other_image(n, g); assert (p != torch.arange(n)).all() and p.min() >= 0 and p.max() < n
    with pytest.raises(ValueError, match="at least 2 images"): other_image(1)

def test_data_loss_is_ce_on_teacher_argmax():
    g = torch.Generator().manual_seed(2)
    il, ig = torch.randn(2, 5, 3, 3, generator=g, dtype=D), torch.randn(2, 5, 3, 3, generator=g, dtype=D)
    t = ig.argmax(1)
    ref = -np.mean([float(torch.log_softmax(il[n, :, i, j], 0)[t[n, i, j]]) for n in range(2) for i in range(3) for j in range(3)])
    assert abs(float(data_loss(il, ig)) - ref) < 1e-12

def test_gradient_routing_and_ema():
    torch.manual_seed(0)
    proj, proto = Projector(6, 8).double(), Prototypes(4, 8, alpha=0.9).double()
    f = torch.randn(2, 6, 3, 3, dtype=D)
    fs, z = proj(f)
    il, ig = proto(z)
    data_loss(il, ig).backward(retain_graph=True)
    assert proto.local.grad.abs().sum() > 0 and all(p.grad is None for p in proj.parameters())
    proto.local.grad = None
    smoothness_loss(fs, torch.softmax(ig / 0.1, 1), perm=torch.tensor([1, 0]))['loss'].backward()
    assert proto.local.grad is None and all(p.grad.abs().sum() > 0 for p in proj.parameters())
    assert not proto.teacher.requires_grad
    t0, proto.local.data = proto.teacher.clone(), torch.randn(4, 8, dtype=D)
    for _ in range(7): proto.update_teacher()
    torch.testing.assert_close(proto.teacher, 0.9 ** 7 * t0 + (1 - 0.9 ** 7) * proto.local, rtol=0, atol=1e-12)

def test_stego_loss_matches_loop():
    g = torch.Generator().manual_seed(3)
    f, c = torch.randn(3, 5, 2, 2, generator=g, dtype=D), torch.randn(3, 4, 2, 2, generator=g, dtype=D)
    perm = torch.tensor([1, 2, 0]); ref = 0.
    for other, b in ((torch.arange(3), 0.1), (perm, 0.4)):
        S = _naive_S(f, f[other], True)
        ref += np.mean([-min(max(float(F.cosine_similarity(c[n, :, i, j], c[other[n], :, k, l], dim=0)), 0.), 0.8) * (float(S[n, i, j, k, l]) - b)
                        for n, i, j, k, l in _pairs(3, 2, 2, 2, 2)])
    assert abs(float(stego_loss(f, c, 0.1, 0.4, perm)) - ref) < 1e-12

def _region_features(n, seed, noise=0.3):
    "Images whose left/right halves belong to one of 3 classes, each class a fixed direction in feature space plus noise."
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 8) * 3
    Y = torch.zeros(n, 4, 4, dtype=torch.long)
    for k in range(n):
        a, b = torch.randperm(3, generator=g)[:2]; Y[k, :, :2], Y[k, :, 2:] = a, b
    return (centres[Y] + noise * torch.randn(n, 4, 4, 8, generator=g)).permute(0, 3, 1, 2).contiguous(), Y

def test_smooseg_learns_separable_regions():
    Ftr, _ = _region_features(64, 0); Fte, Yte = _region_features(32, 1)
    head = fit_head('SmooSeg', Ftr, seed=0, steps=60, bs=16, n_clusters=3, shift_intra=calibrate_shift(Ftr, n=64), lr1=1e-2, lr2=1e-2, dim=8)
    r = evaluate_head(head, Fte, Yte, num_classes=3)
    one = evaluate_head(None, torch.ones_like(Fte), Yte, num_classes=3)      # every feature equal: one cluster
    assert r['mIoU'] > one['mIoU'] + 0.3 and r['acc'] > 0.8, (r, one)

def test_labels_maps():
    lut = cocostuff27_lut()
    assert sorted(set(lut[:171].tolist())) == list(range(27)) and (lut[171:] == 255).all()
    assert [COCOSTUFF27[lut[t]] for t in (0, 2, 79, 80, 137, 170)] == ['person', 'vehicle', 'indoor', 'textile', 'ground', 'solid']
    assert np.bincount(lut[:80], minlength=27)[:12].tolist() == [6, 5, 10, 6, 7, 7, 5, 10, 5, 1, 10, 8]   # things per supercategory
    c = cityscapes27_lut(); assert c[7] == 0 and c[33] == 26 and c[6] == 255 and c[34] == 255

def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="f1, f2: expected"): feature_affinity(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="feats, probs: expected"): smoothness_loss(torch.randn(2, 3, 2, 2), torch.rand(2, 4, 3, 2))
    with pytest.raises(ValueError, match="alpha: expected"): Prototypes(3, 4, alpha=1.5)
    with pytest.raises(ValueError, match="temperature: expected"): SmooSegLoss(temperature=-1)
    with pytest.raises(TypeError, match="backbone: expected an nn.Module"): SmooSeg(4, 3, backbone=lambda x: x)
    with pytest.raises(TypeError, match="out: expected the dict"): SmooSegLoss()(torch.randn(2, 3, 2, 2))

def test_potsdam_tiles_and_merge(tmp_path):
    "Potsdam's .mat tiles (substrate fixture): the loader's labels are IIC's 6 -> 3 merge of 'gt', its images the R, G, B of 'img'."
    from scipy.io import loadmat
    from xwlearn.vision.datasets import write_fixture, potsdam3_lut
    from xwlearn.repro.smooseg import seg_pairs, UnsupSegData
    root = write_fixture('potsdam', tmp_path/'potsdam', n=2)
    pairs = seg_pairs(root, 'potsdam', 'val')
    assert [p[0].name for p in pairs] == ['2.mat', '3.mat']                     # labelled_test.txt, in order
    x, y = UnsupSegData(pairs, potsdam3_lut(), 'val', 64)[0]                     # 64-px tiles: resize and crop are identities
    img, gt = loadmat(pairs[0][0])['img'], loadmat(pairs[0][1])['gt']
    merge = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}                                 # roads+cars, buildings+clutter, vegetation+trees
    assert torch.equal(y, torch.from_numpy(np.vectorize(merge.get)(gt)).long()) and len(np.unique(gt)) > 1
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(x, (torch.from_numpy(img[..., :3]).permute(2, 0, 1).float() / 255 - mean) / std)
    assert len(UnsupSegData(seg_pairs(root, 'potsdam', 'train'), potsdam3_lut(), 'train', 32, five_crop=False)) == 2
    assert len(UnsupSegData(seg_pairs(root, 'potsdam', 'train'), potsdam3_lut(), 'train', 32)) == 10   # five-crops when asked
    with pytest.raises(ValueError, match="split: expected 'train' or 'val' for potsdam"): seg_pairs(root, 'potsdam', 'test')
    with pytest.raises(ValueError, match="dataset: expected 'cocostuff', 'cityscapes' or 'potsdam'"): seg_pairs(root, 'voc', 'train')
