"Tests of xwlearn.seg.diverse_cotraining (block DCT vs scipy, the DCT input, CPS loss vs a pixel loop, CutMix, the step and the callback's exact resume) and of the VOC pieces of xwlearn.repro.diverse_cotraining."
import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from xwlearn.seg.diverse_cotraining import (dct_matrix, block_dct, block_idct, DCTInput, zigzag_subset, rgb_to_ycbcr, cutmix_box, cutmix,
                                            pseudo_labels, cps_loss, agreement_ratio, TinyUNet, SegFormer, EfficientAttention, Branch,
                                            CoTraining, cotraining_loss, cross_pseudo_step, DiverseCotraining, strong_view)

torch.set_num_threads(1)

@pytest.mark.parametrize("shape,n", [((1, 1, 8, 8), 8), ((2, 3, 16, 24), 8), ((1, 2, 12, 8), 4)])
def test_block_dct_is_scipy_dctn_per_block_and_invertible(shape, n):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = block_dct(x, n)
    B, C, H, W = shape
    ref = scipy.fft.dctn(x.numpy().reshape(B, C, H // n, n, W // n, n), axes=(3, 5), norm='ortho')     # (B, C, h, k, w, l)
    np.testing.assert_allclose(f.numpy(), ref.transpose(0, 1, 3, 5, 2, 4).reshape(B, C * n * n, H // n, W // n), rtol=0, atol=1e-12)
    torch.testing.assert_close(block_idct(f, n), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(dct_matrix(n) @ dct_matrix(n).T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-14)

def test_block_dct_errors():
    with pytest.raises(ValueError, match="divisible by the block size 8"): block_dct(torch.zeros(1, 1, 9, 8))
    with pytest.raises(TypeError, match=r"expected a \(B, C, H, W\) tensor"): block_dct(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="f: expected"): block_idct(torch.zeros(1, 63, 2, 2))

def test_dct_input_standardises_pads_and_keeps_the_subset():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 32, 32, generator=g)
    enc = DCTInput().fit(x)
    z = enc(x)
    assert z.shape == (5, 64, 8, 8)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(64), rtol=0, atol=1e-3)
    assert enc(torch.rand(1, 3, 13, 30, generator=g)).shape == (1, 64, 4, 8)
    s = zigzag_subset(44, 10)
    assert len(s) == 64 and s[:4] == [0, 1, 2, 3] and all(64 <= i < 128 for i in s[44:54]) and len(set(s)) == 64
    with pytest.raises(ValueError, match="subset: expected channel indices"): DCTInput([-1])
    with pytest.raises(ValueError, match=r"x: expected \(B, 3, H, W\) RGB"): rgb_to_ycbcr(torch.zeros(1, 4, 8, 8))

def _cps_loop(logits, lab, conf, valid, thr):
    num, den = 0.0, 0
    for b, i, j in np.ndindex(*lab.shape):
        if valid[b, i, j]:
            den += 1
            if conf[b, i, j] >= thr: num -= F.log_softmax(logits[b, :, i, j], 0)[lab[b, i, j]].item()
    return num / den

@pytest.mark.parametrize("seed", [0, 1])
def test_cps_loss_matches_a_pixel_loop(seed):
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    lab, conf = pseudo_labels(3 * torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g))
    valid = torch.rand(2, 4, 5, generator=g) > 0.3
    assert abs(cps_loss(lg, lab, conf, valid, 0.7).item() - _cps_loop(lg, lab, conf, valid, 0.7)) < 1e-12
    # agreement among pixels confident in both
    l2, c2 = pseudo_labels(3 * torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g))
    both = (conf >= 0.6) & (c2 >= 0.6) & valid
    want = ((lab == l2) & both).sum().item() / max(both.sum().item(), 1e-10)
    assert abs(agreement_ratio(lab, conf, l2, c2, valid, 0.6) - want) < 1e-9

def test_cutmix_box_and_mixing():
    g = torch.Generator().manual_seed(0)
    b = cutmix_box(32, 32, 48, g, p=1.0, cell=4)
    c = b.reshape(32, 8, 4, 12, 4)
    assert (c.all((2, 4)) | ~c.any((2, 4))).all() and (b.float().mean((1, 2)) <= 0.4).all() and b.any((1, 2)).float().mean() > 0.8
    assert not cutmix_box(16, 16, 16, g, p=0.0).any()
    x = torch.arange(4.).reshape(4, 1, 1, 1).expand(4, 2, 16, 16); perm = torch.tensor([3, 2, 1, 0])
    m = cutmix(x, cutmix_box(4, 16, 16, g, p=1.0, cell=4), perm)
    assert set(m[0].unique().tolist()) <= {0., 3.}
    with pytest.raises(ValueError, match="cell: expected a divisor"): cutmix_box(1, 10, 16, g, cell=4)

def test_segformer_attention_and_shapes():
    att = EfficientAttention(8, heads=2, sr=1).double()
    t = torch.randn(1, 9, 8, dtype=torch.float64)
    q = att.q(t).reshape(1, 9, 2, 4).transpose(1, 2); k, v = att.kv(t).reshape(1, 9, 2, 2, 4).permute(2, 0, 3, 1, 4)
    ref = att.proj((torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(1, 2).reshape(1, 9, 8))
    torch.testing.assert_close(att(t, 3, 3), ref, rtol=0, atol=1e-12)
    sf = SegFormer(64, 5, dims=(8, 16), depths=(1, 1), heads=(1, 2), srs=(2, 1), strides=(1, 2), dec=8)
    assert sf(torch.rand(2, 64, 8, 8)).shape == (2, 5, 8, 8)
    with pytest.raises(ValueError, match="expected equal lengths"): SegFormer(dims=(8,), depths=(1, 1))

def _pair(seed=0):
    torch.manual_seed(seed)
    return CoTraining(Branch(TinyUNet(3, 3, 4, depth=2)), Branch(TinyUNet(64, 3, 4, depth=1), DCTInput()),
                      Branch(TinyUNet(3, 3, 4, depth=1)))

def test_three_branch_step_and_errors():
    m, x = _pair(), torch.rand(4, 3, 16, 16)
    lu, st = cross_pseudo_step(m, x, torch.Generator().manual_seed(0), thr=0.0, p_cutmix=1.0)
    assert lu.shape == (3,) and lu.requires_grad and 0 <= st['agreement'] <= 1 and len(st['confident']) == 3
    lu.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    z, st0 = cross_pseudo_step(m, x, torch.Generator().manual_seed(0), thr=1.01)
    assert torch.equal(z, torch.zeros(3)) and st0['agreement'] == 0.0
    with pytest.raises(ValueError, match="eval_branch: expected 0..2"): CoTraining(*m.branches, eval_branch=3)
    with pytest.raises(ValueError, match="thr: expected a confidence"): DiverseCotraining(x, thr=2.0)
    x2 = strong_view(x, torch.Generator().manual_seed(0))
    assert x2.shape == x.shape and not torch.equal(x2, x)

def _learner(out, X, Y, seed=0):
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from fastcore.basics import noop
    from xwlearn.data import tensor_dls
    dls = tensor_dls(X[:8], Y[:8], X[8:12], Y[8:12], bs=4, seed=seed, device='cpu')
    learn = Learner(dls, _pair(seed), loss_func=cotraining_loss, opt_func=Adam, lr=1e-2, cbs=[DiverseCotraining(X[12:], bs=4, thr=0.5, seed=seed)])
    learn.logger = noop
    return learn

def test_callback_resumes_exactly_through_checkpoints(tmp_path):
    "2 epochs in one go == 1 epoch, checkpoint, a new Learner restored from it, the 2nd epoch: same weights and agreement history."
    from xwlearn.recipes import CheckpointCallback, SkipFinishedEpochs
    from xwlearn.core import set_seed
    g = torch.Generator().manual_seed(0)
    X, Y = torch.rand(20, 3, 16, 16, generator=g), torch.randint(0, 3, (20, 16, 16), generator=g)
    set_seed(0); a = _learner(tmp_path/'a', X, Y); a.fit(2, cbs=[CheckpointCallback(tmp_path/'a')])
    set_seed(0); b = _learner(tmp_path/'b', X, Y); b.fit(1, cbs=[CheckpointCallback(tmp_path/'b')])
    set_seed(1); c = _learner(tmp_path/'b', X, Y); ck = CheckpointCallback(tmp_path/'b'); start = ck.restore(c)
    assert start == 1
    c.fit(2, cbs=[ck, SkipFinishedEpochs(start)])
    for (k, v), w in zip(a.model.state_dict().items(), c.model.state_dict().values()): torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert c.cotraining.history['agreement'] == a.cotraining.history['agreement'] and len(a.cotraining.history['agreement']) == 4
    with pytest.raises(TypeError, match="learn.model: expected a `CoTraining`"):
        from fastai.learner import Learner
        Learner(a.dls, TinyUNet(3, 3, 4, 1), loss_func=cotraining_loss, cbs=[DiverseCotraining(X)]).fit(1)

def test_voc_dataset_on_the_fixture(tmp_path):
    from xwlearn.vision.datasets import write_fixture
    from xwlearn.repro.diverse_cotraining import VOCSemi, voc_partition
    write_fixture('voc', tmp_path)
    ids = (tmp_path/'VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt').read_text().split()
    lab, unl = voc_partition(ids, ids, 2)
    assert len(lab) == 2 and len(unl) == len(ids) - 2
    x, y = VOCSemi(tmp_path, lab, 'train_l', 32)[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(y.unique().tolist()) <= set(range(21)) | {255}
    xu, valid = VOCSemi(tmp_path, unl, 'train_u', 96)[0]
    assert xu.shape == (3, 96, 96) and valid.dtype == torch.bool and not valid.all()      # a 64-px image padded to 96 at scale < 1.5
    with pytest.raises(ValueError, match="mode: expected 'train_l'"): VOCSemi(tmp_path, lab, 'test')
