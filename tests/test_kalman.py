"""Batch Kalman Normalization (`xwlearn.norm.kalman`; `mnist1d_norm_model` from `xwlearn.repro.kalman`) against independent naive references and `nn.BatchNorm`."""
import copy, pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from xwlearn.norm.kalman import (BatchKalmanNorm1d, BatchKalmanNorm2d, grouped_moments, kalman_update, predict_moments,
                                 relu_moments, convert_bn_to_bkn, precise_bn, ResidualPrediction)
from xwlearn.repro.kalman import mnist1d_norm_model, convert_preact_to_bkn
from xwlearn.nets import preact_cifar_resnet, PreActCifarResNet
from xwlearn.nets import mnist1d_mlp, mnist1d_cnn, cifar_resnet

torch.set_num_threads(1)
D = torch.float64


def naive_grouped(x, g):
    "Per-group moments by an explicit loop over groups."
    ms, vs = [], []
    for i in range(0, x.shape[0], g):
        xi = x[i:i + g].transpose(0, 1).reshape(x.shape[1], -1)
        ms.append(xi.mean(1)); vs.append(((xi - xi.mean(1, keepdim=True)) ** 2).mean(1))
    return torch.stack(ms), torch.stack(vs)


@pytest.mark.parametrize("shape,g", [((8, 3), 2), ((12, 4, 5), 3), ((8, 2, 3, 3), 4), ((6, 5), None)])
def test_grouped_moments(shape, g):
    x = torch.randn(*shape, dtype=D)
    m, v, n = grouped_moments(x, g)
    rm, rv = naive_grouped(x, g or shape[0])
    torch.testing.assert_close(m, rm); torch.testing.assert_close(v, rv)


def test_kalman_update_formula_and_fallback():
    mo, vo, mp, vp = (torch.rand(3, 4, dtype=D) + 0.1 for _ in range(4))
    p = 0.7
    mu, var, pe = kalman_update(mo, vo, mp, vp, p=p)
    torch.testing.assert_close(mu, p * mp + (1 - p) * mo)
    torch.testing.assert_close(var, p * vp + (1 - p) * vo + p * (1 - p) * (mo - mp) ** 2)
    mu, var, pe = kalman_update(mo, vo, mp, vo * 200, p=p)       # ratio ≥ 100: the observation alone
    assert pe.item() == 0.0
    torch.testing.assert_close(mu, mo); torch.testing.assert_close(var, vo)


@pytest.mark.parametrize("cls,ref,shape", [(BatchKalmanNorm1d, nn.BatchNorm1d, (8, 5)), (BatchKalmanNorm1d, nn.BatchNorm1d, (8, 5, 6)),
                                           (BatchKalmanNorm2d, nn.BatchNorm2d, (8, 5, 3, 3))])
@pytest.mark.parametrize("g", [None, 2, 4])
def test_p0_equals_batchnorm(cls, ref, shape, g):
    torch.manual_seed(0)
    a, b = cls(shape[1], group_size=g, p=0.0).double(), ref(shape[1]).double()
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5); a.bias.normal_(); b.weight.copy_(a.weight); b.bias.copy_(a.bias)
    G = shape[0] // (g or shape[0])
    bns = [copy.deepcopy(b) for _ in range(G)]
    for _ in range(3):
        x = torch.randn(*shape, dtype=D) * 3 + 1
        chunks = x.chunk(G)
        torch.testing.assert_close(a(x), torch.cat([bn(c) for bn, c in zip(bns, chunks)]))
    torch.testing.assert_close(a.running_mean, torch.stack([bn.running_mean for bn in bns]).mean(0))
    torch.testing.assert_close(a.running_var, torch.stack([bn.running_var for bn in bns]).mean(0))
    b.load_state_dict(a.state_dict()); a.eval(); b.eval()
    torch.testing.assert_close(a(x), b(x))


class _Src:
    def __init__(self, mu, var, spatial): self.e = (mu, var, spatial)
    def estimate(self): return self.e


class _Pair(nn.Module):
    def __init__(self, bkn, layer): super().__init__(); self.bkn, self.layer = bkn, layer
    def forward(self, x, mu, var, spatial): return self.bkn.link(_Src(mu, var, spatial), nn.ReLU(), self.layer)(x)


@pytest.mark.parametrize("layer,bkn,xshape,spatial", [
    (nn.Linear(4, 3), BatchKalmanNorm1d(3, group_size=2, p=0.8, mc_samples=0), (6, 3), ()),
    (nn.Conv2d(2, 3, 3, 2, 1), BatchKalmanNorm2d(3, group_size=2, p=0.9, mc_samples=0), (4, 3, 2, 2), (4, 4))])
def test_gradcheck_linked_closed_form(layer, bkn, xshape, spatial):
    "Gradients w.r.t. input, predecessor estimate, the shared weight layer and γ/β, in float64."
    torch.manual_seed(1)
    pair = _Pair(bkn, layer).double(); names = [n for n, _ in pair.named_parameters()]
    def f(x, mu, var, *ps): return torch.func.functional_call(pair, dict(zip(names, ps)), (x, mu, var.abs() + 0.2, spatial))
    G, C_in = xshape[0] // 2, layer.weight.shape[1]
    args = [torch.randn(*xshape, dtype=D), torch.randn(G, C_in, dtype=D), torch.rand(G, C_in, dtype=D)]
    args += [p.detach().clone() + 0.1 * torch.randn_like(p) for p in pair.parameters()]
    assert torch.autograd.gradcheck(f, [a.requires_grad_() for a in args], eps=1e-6, atol=1e-5)


def test_mc_matches_closed_form():
    torch.manual_seed(2)
    conv = nn.Conv1d(3, 4, 3, 2, 1).double()
    mu, var = torch.randn(2, 3, dtype=D), torch.rand(2, 3, dtype=D) + 0.3
    m0, v0 = predict_moments(mu, var, (8,), nn.ReLU(), conv, mc_samples=0)
    m1, v1 = predict_moments(mu, var, (8,), nn.ReLU(), conv, mc_samples=100_000)
    torch.testing.assert_close(m1, m0, atol=0.02, rtol=0.0); torch.testing.assert_close(v1, v0, atol=0.03 * v0.max().item(), rtol=0.0)
    z = F.relu(mu[0] + var[0].sqrt() * torch.randn(200_000, 3, dtype=D))
    rm, rv = relu_moments(mu[0], var[0])
    torch.testing.assert_close(rm, z.mean(0), atol=5e-3, rtol=0); torch.testing.assert_close(rv, z.var(0), atol=5e-3, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D or 3-D"): BatchKalmanNorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4-D"): BatchKalmanNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="channels"): BatchKalmanNorm2d(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="group_size"): BatchKalmanNorm1d(4, group_size=3)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="more than 1 value"): BatchKalmanNorm1d(4, group_size=1)(torch.randn(4, 4))


def test_convert_models():
    torch.manual_seed(3)
    mlp = mnist1d_mlp().double(); x = torch.randn(16, 40, dtype=D)
    same = convert_bn_to_bkn(copy.deepcopy(mlp), p=0.0)
    torch.testing.assert_close(same(x), mlp(x))
    for model, xb in [(mnist1d_cnn(), torch.randn(8, 1, 40)), (cifar_resnet(8), torch.randn(4, 3, 16, 16)), (mnist1d_mlp(), torch.randn(8, 40))]:
        m = convert_bn_to_bkn(model, group_size=2, p=0.9)
        m(xb).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        m2 = pickle.loads(pickle.dumps(m)); m2(xb); copy.deepcopy(m)(xb)
        m.eval(); assert m(xb).shape == (xb.shape[0], 10)
    with pytest.raises(TypeError, match="nn.Sequential"): convert_bn_to_bkn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no nn.BatchNorm"): convert_bn_to_bkn(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"supports \[ReLU\]"):
        convert_bn_to_bkn(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.MaxPool1d(1), nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.raises(TypeError, match="direct children"):
        convert_bn_to_bkn(nn.Sequential(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))))


def test_precise_bn_restores_settings():
    torch.manual_seed(4)
    net = mnist1d_norm_model('mlp', 'bkn', micro=2)
    precise_bn(net, [torch.randn(32, 40) for _ in range(5)], n_batches=5)
    layers = [m for m in net.modules() if isinstance(m, BatchKalmanNorm1d)]
    assert not net.training and all(l.group_size == 2 and l.p == 0.9 and l.momentum == 0.1 for l in layers)
    assert all(l.num_batches_tracked.item() == 5 for l in layers)


def test_torchvision_resnet_conversion():
    "torchvision ResNets: p=0 equals micro-batch BN group by group; links as documented; unsupported parts fail clearly."
    import torchvision
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None, num_classes=5).double()
    x = torch.randn(4, 3, 64, 64, dtype=D)
    b0 = convert_bn_to_bkn(copy.deepcopy(r18), group_size=2, p=0.0)
    torch.testing.assert_close(b0(x), torch.cat([r18(x[:2]), r18(x[2:])]), rtol=1e-8, atol=1e-8)
    r50 = convert_bn_to_bkn(torchvision.models.resnet50(weights=None), group_size=4, p=0.9)
    bkns = [m for m in r50.modules() if isinstance(m, BatchKalmanNorm2d)]
    assert len(bkns) == 53 and sum(bool(m._link) for m in bkns) == 50
    assert r50.layer3[1].bn1._link[0].branch is r50.layer3[0].bn3 and r50.layer3[1].bn1._link[0].shortcut is r50.layer3[0].downsample[1]
    assert r50.layer3[0].downsample[1]._link[2] is r50.layer3[0].downsample[0]
    with pytest.raises(TypeError, match="expected nn.BatchNorm2d"):
        convert_bn_to_bkn(torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(2, c)))


def test_autocast_bf16_forward_backward():
    "Under CPU autocast the convs emit bf16 while the running statistics stay float32 (used to fail in `lerp_`)."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4))
    ref = convert_bn_to_bkn(net, group_size=2, mc_samples=0)
    bkn = copy.deepcopy(ref)
    x = torch.randn(8, 3, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = bkn(x)
        y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16
    for m in bkn.modules():
        if isinstance(m, BatchKalmanNorm2d):
            assert m.running_mean.dtype == m.running_var.dtype == torch.float32
            assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all() and m.num_batches_tracked == 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bkn.parameters())
    y32 = ref(x)                                                    # float32 forward: the same up to bf16 rounding
    assert (y.float() - y32).abs().max() < 0.15
    for a, b in zip(bkn.modules(), ref.modules()):
        if isinstance(a, BatchKalmanNorm2d): torch.testing.assert_close(a.running_var, b.running_var, rtol=0.05, atol=0.02)
    bkn.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16): assert bkn(x).dtype == torch.bfloat16


def test_residual_prediction_pads_per_group_not_flat():
    "The official tf.pad on the flat group-major statistics misaligns groups; ResidualPrediction pads each group's channels."
    G, C = 4, 2
    est = (10 * torch.arange(G, dtype=D)[:, None] + torch.arange(C, dtype=D))      # (G, C): 10·group + channel
    flat = F.pad(est.flatten(), (G * C // 2, G * C // 2)).view(G, 2 * C)           # the official form
    assert (flat[0] == 0).all() and flat[1].tolist() == [0., 1., 10., 11.]
    conv = nn.Conv2d(2 * C, 2 * C, 1, bias=False).double()
    nn.init.zeros_(conv.weight)                                                      # the branch adds nothing: the sum = the padded shortcut
    rp = ResidualPrediction(_Src(est, est, (4, 4)), _Src(torch.zeros(G, 2 * C, dtype=D), torch.ones(G, 2 * C, dtype=D), (4, 4)),
                            nn.ReLU(), conv, extra=C, mc_samples=0)
    m, v, sp = rp.estimate()
    torch.testing.assert_close(m[:, 1:3], est); assert (m[:, [0, 3]] == 0).all() and sp == (4, 4)
    assert not torch.equal(m, flat)


def test_residual_prediction_matches_sampled_sum():
    "shortcut + conv(ReLU(z)) with independent parts: the predicted moments equal the sampled sum's (closed form)."
    torch.manual_seed(5)
    G, C, L = 2, 3, 9
    conv = nn.Conv1d(C, C, 3, padding=1).double()
    ms, vs = torch.randn(G, C, dtype=D), torch.rand(G, C, dtype=D) + 0.2
    mb, vb = torch.randn(G, C, dtype=D), torch.rand(G, C, dtype=D) + 0.2
    m, v, _ = ResidualPrediction(_Src(ms, vs, (L,)), _Src(mb, vb, (L,)), nn.ReLU(), conv, mc_samples=0).estimate()
    N = 20_000
    z = mb[None, :, :, None] + vb.sqrt()[None, :, :, None] * torch.randn(N, G, C, L, dtype=D)
    with torch.no_grad(): c = conv(F.relu(z).view(N * G, C, L)).view(N, G, C, L)
    s = ms[None, :, :, None] + vs.sqrt()[None, :, :, None] * torch.randn(N, G, C, L, dtype=D)
    y = (c + s).transpose(0, 1).reshape(G, N, C, L).transpose(1, 2).reshape(G, C, -1)
    torch.testing.assert_close(m, y.mean(-1), atol=0.03, rtol=0); torch.testing.assert_close(v, y.var(-1), atol=0.05 * v.max().item(), rtol=0)


def test_preact_resnet_official_links():
    "The official pre-activation ResNet: p=0 is micro-batch BN group by group; KN layers linked as in cifar-kn-microbatch.py."
    torch.manual_seed(6)
    net = preact_cifar_resnet(8).double(); x = torch.randn(4, 3, 16, 16, dtype=D)
    b0 = convert_preact_to_bkn(copy.deepcopy(net), group_size=2, p=0.0)
    torch.testing.assert_close(b0(x), torch.cat([net(x[:2]), net(x[2:])]))
    k = convert_preact_to_bkn(preact_cifar_resnet(20), group_size=2, p=0.9, mc_samples=64)
    kns = [m for m in k.modules() if isinstance(m, BatchKalmanNorm2d)]
    assert len(kns) == 19 and sum(bool(m._link) for m in kns) == 18 and k.blocks[0].bn1 is None
    b3 = k.blocks[3]                                                   # first unit of stage 2: stride 2, 16 → 32
    assert b3.bn1._link[2] is None and isinstance(b3.bn1._link[0], ResidualPrediction) and b3.bn1._link[0].branch is k.blocks[2].bn2
    assert k.blocks[4].bn1._link[0].extra == 16 and k.bn._link[0].branch is k.blocks[-1].bn2
    calls = []
    orig = ResidualPrediction.estimate
    def counting(self): calls.append(self._cache is not None and self._cache[1] is self.branch.estimate()); return orig(self)
    ResidualPrediction.estimate = counting
    try: k(torch.randn(4, 3, 32, 32)).sum().backward()
    finally: ResidualPrediction.estimate = orig
    assert len(calls) > 9 and sum(calls) == len(calls) - 9              # each of the 9 sums computed once, then served from the cache
    assert all(p.grad is not None for p in k.parameters())
    pickle.loads(pickle.dumps(k))(torch.randn(4, 3, 32, 32)); copy.deepcopy(k).eval()(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="PreActCifarResNet"): convert_preact_to_bkn(cifar_resnet(8))
