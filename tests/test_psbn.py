"""psBN (`xwlearn.norm.psbn`): equivalence with nn.BatchNorm, gradients, errors, the collapse definition, the Monte-Carlo.

psBN here is y = BN(x) + α (formula from the third-party kekmodel/FixMatch-pytorch `PSBatchNorm2d`; UNVERIFIED against
the paper's §5). The references below use torch's own BatchNorm, not the module's code.
"""
import copy
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from xwlearn.norm.psbn import (PostShiftedBatchNorm1d, PostShiftedBatchNorm2d, to_post_shifted, collapsed_channels,
                               collapse_summary, collapse_prob, loglog_slope, relu_gates, CollapsedFilterMonitor)
from xwlearn.nets import mnist1d_cnn, cifar_resnet, BasicBlock

torch.set_num_threads(1)


@pytest.mark.parametrize("cls,ref,shape", [(PostShiftedBatchNorm1d, nn.BatchNorm1d, (6, 4)),
                                           (PostShiftedBatchNorm1d, nn.BatchNorm1d, (6, 4, 9)),
                                           (PostShiftedBatchNorm2d, nn.BatchNorm2d, (5, 4, 3, 7))])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7])
def test_equals_batchnorm_with_shifted_beta(cls, ref, shape, alpha):
    "psBN(γ, β) ≡ BN(γ, β+α) in train and eval mode (outputs, running stats); α=0 is plain BN."
    torch.manual_seed(0)
    ps, bn = cls(shape[1], alpha=alpha).double(), ref(shape[1]).double()
    with torch.no_grad():
        ps.weight.normal_(); ps.bias.normal_(); bn.weight.copy_(ps.weight); bn.bias.copy_(ps.bias + alpha)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 - 1
        torch.testing.assert_close(ps(x), bn(x))
    torch.testing.assert_close(ps.running_mean, bn.running_mean); torch.testing.assert_close(ps.running_var, bn.running_var)
    ps.eval(); bn.eval(); x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ps(x), bn(x))
    assert isinstance(ps, ref)


@pytest.mark.parametrize("cls,shape", [(PostShiftedBatchNorm1d, (5, 3, 4)), (PostShiftedBatchNorm2d, (3, 2, 3, 3))])
def test_gradcheck_float64(cls, shape):
    m = cls(shape[1]).double()
    with torch.no_grad(): m.weight.uniform_(0.5, 1.5); m.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, True) + m.alpha, (x, w, b))


def test_clear_errors():
    with pytest.raises(ValueError, match="4-D input"): PostShiftedBatchNorm2d(3)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="2-D or 3-D"): PostShiftedBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="got 5 channels"): PostShiftedBatchNorm2d(3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="got 2 channels"): PostShiftedBatchNorm1d(3)(torch.randn(4, 2))


def test_to_post_shifted_keeps_the_function():
    torch.manual_seed(0)
    net = mnist1d_cnn(); x = torch.randn(16, 1, 40)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.1 * torch.randn_like(p))
        net(x)
        ps = to_post_shifted(copy.deepcopy(net), alpha=0.3)
        net.eval(); ps.eval(); torch.testing.assert_close(ps(x), net(x), rtol=1e-5, atol=1e-5)
        net.train(); ps.train(); torch.testing.assert_close(ps(x), net(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, PostShiftedBatchNorm1d) for m in ps.modules()) == 4


def test_collapsed_channel_definition():
    "Dead = BN output ≤ 0 on every sample and position in eval mode; the same channels after conversion to psBN."
    torch.manual_seed(0)
    net = mnist1d_cnn(); x = torch.randn(64, 1, 40)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d): m.momentum = None   # cumulative average: one pass gives the exact statistics
    with torch.no_grad():
        net[1].bias[[2, 7]] = -50.0
        net[4].bias[5] = 50.0; net[4].weight[5] = 0.0           # constant positive: alive
        net[7].weight[1] = 1e-3                                  # small γ, not dead
        net.train(); net(x)                                      # then the running statistics of this network
    dl = [(x[:32], None), (x[32:], None)]
    for model in (net, to_post_shifted(copy.deepcopy(net))):
        r = collapsed_channels(model, dl)
        assert r['1']['dead'].nonzero().flatten().tolist() == [2, 7]
        assert r['4']['dead'].sum() == 0 and r['7']['small_gamma'].nonzero().flatten().tolist() == [1]
        s = collapse_summary(r); assert s['dead'] == 2 and s['channels'] == 128
    assert net.training


def test_monte_carlo_scale_invariance_and_slope():
    etas, g0s = np.array([0.01, 0.02, 0.04]), np.array([1.0, 2.0, 4.0])
    P = collapse_prob(etas, g0s, 't2', steps=10, walkers=20_000)
    assert P[0, 0] == P[1, 1] == P[2, 2] and P[0, 1] == P[1, 2]      # depends on η/γ₀ only, exactly
    P1 = collapse_prob(np.array([0.02, 0.08]), [1.0], 't2', steps=1, walkers=1_000_000)[:, 0]
    slope = np.log(P1[1] / P1[0]) / np.log(4)
    assert 1.8 < slope < 2.7
    Pg = collapse_prob(np.array([0.3, 0.6]), [1.0], 'gauss', steps=1, walkers=200_000)[:, 0]
    assert (Pg <= (1 + 9) / 9 * np.array([0.3, 0.6]) ** 2).all()   # Chebyshev bound, c = 3


def test_gaussian_noise_is_far_steeper_than_eta_squared():
    "The exponent 2 needs heavy tails: on η/γ₀ ∈ [0.28, 0.8] t₂ noise fits ≈ 1.8, Gaussian noise ≈ 5."
    etas, n = np.array([0.28, 0.4, 0.56, 0.8]), 400_000
    st = loglog_slope(etas, collapse_prob(etas, [1.0], 't2', walkers=n)[:, 0], n)
    sg = loglog_slope(etas, collapse_prob(etas, [1.0], 'gauss', walkers=n)[:, 0], n)
    assert 1.5 < st < 2.3 and 4.3 < sg < 5.6


def test_psbn_revives_under_weight_decay_bn_does_not():
    "A collapsed channel with zero loss gradient: L2 shrinks (γ, β) → 0; BN stays dead, psBN comes back."
    torch.manual_seed(0)
    x = torch.randn(64, 2, 10)
    out = {}
    for name, cls in (('bn', nn.BatchNorm1d), ('ps', PostShiftedBatchNorm1d)):
        m = cls(2)
        with torch.no_grad(): m.bias[0] = -5.0 - (0.1 if name == 'ps' else 0.0)
        opt = torch.optim.SGD(m.parameters(), lr=1.0, weight_decay=0.05)
        alive = []
        for _ in range(120):
            y = m(x); loss = (F.relu(y).mean((0, 2)) - 1).pow(2).sum()
            opt.zero_grad(); loss.backward(); opt.step(); alive.append(bool(y[:, 0].max() > 0))
        out[name] = alive
    assert not any(out['bn']) and out['ps'][-1]


def test_monitor_records_history():
    from fastai.learner import Learner
    from fastai.callback.progress import ProgressCallback  # noqa: F401 (adds `Learner.no_bar`; the method module no longer imports it)
    from xwlearn.data import mnist1d_dls
    dls = mnist1d_dls(bs=256, seed=0, as_channels=True, device='cpu', n_train=500, n_test=250)
    learn = Learner(dls, mnist1d_cnn(norm=PostShiftedBatchNorm1d), cbs=CollapsedFilterMonitor(every=2))
    with learn.no_bar(), learn.no_logging(): learn.fit(3, lr=1e-2)
    h = learn.collapsed_filter_monitor.history
    assert [e['epoch'] for e in h] == [2, 3] and all(e['channels'] == 128 for e in h)


def _block_with_dead_channels():
    torch.manual_seed(0)
    blk = BasicBlock(4, 4)
    for m in blk.modules():
        if isinstance(m, nn.BatchNorm2d): m.momentum = None
    x = torch.rand(64, 4, 6, 6) * 0.5; x[:, 0] += 2.0               # block input ≥ 0 (after a ReLU), channel 0 large
    with torch.no_grad():
        blk.bn2.weight[0] = 0.1; blk.bn2.bias[0] = -1.0              # BN output ≤ 0, but shortcut makes the sum > 0
        blk.bn2.bias[1] = -50.0; blk.bn1.bias[2] = -50.0
        blk.train(); blk(x)
    return blk, x


def test_residual_block_counts_at_the_relu_after_the_add():
    "bn2 of a basic block feeds the add: a channel with BN output ≤ 0 and a positive shortcut is alive (it gets gradient)."
    blk, x = _block_with_dead_channels()
    for model in (blk, to_post_shifted(copy.deepcopy(blk))):
        r = collapsed_channels(model, [(x, None)])
        assert (r['bn1']['kind'], r['bn2']['kind']) == ('relu', 'post-add')
        assert r['bn2']['bn_nonpos'].nonzero().flatten().tolist() == [0, 1]
        assert r['bn2']['dead'].nonzero().flatten().tolist() == [1] and r['bn1']['dead'].nonzero().flatten().tolist() == [2]
        s = collapse_summary(r)
        assert (s['dead'], s['dead_relu'], s['dead_post_add'], s['channels'], s['bn_nonpos']) == (2, 1, 1, 8, 3)
    blk.eval(); blk.zero_grad(); blk(x).sum().backward()
    g = blk.bn2.bias.grad
    assert g[0] != 0 and g[1] == 0 and blk.bn1.bias.grad[2] == 0   # exactly the channels called dead get no gradient


def test_resnet56_gate_kinds():
    "27 of the 55 BN layers of ResNet-56 feed the residual add, not a ReLU."
    kinds = [k for k, *_ in relu_gates(cifar_resnet(56))[1].values()]
    assert len(kinds) == 55 and kinds.count('relu') == 28 and kinds.count('post-add') == 27


def test_other_and_untraced_layers():
    "A BN before a linear layer is 'other' (not counted); an fx-untraceable model falls back to the BN output."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    r = collapsed_channels(net, [(torch.randn(32, 3), None)])
    assert (r['1']['kind'], r['4']['kind']) == ('relu', 'other') and collapse_summary(r)['channels'] == 4

    class Branchy(nn.Module):
        def __init__(self): super().__init__(); self.bn = nn.BatchNorm1d(3)
        def forward(self, x): return torch.relu(self.bn(x)) if x.sum() > -1e9 else x   # data-dependent: fx cannot trace
    m = Branchy()
    with torch.no_grad(): m.bn.bias[1] = -50.0
    r = collapsed_channels(m, [(torch.randn(16, 3), None)])
    assert r['bn']['kind'] == 'untraced' and r['bn']['dead'].nonzero().flatten().tolist() == [1]
