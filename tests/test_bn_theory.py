"""`xwlearn.norm.bn_theory`: PopulationNorm, exact recalibration, GammaDecay, and the derived decomposition (fast);
`xwlearn.repro.bn_theory`: the ImageNet recipe."""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import xwlearn.core  # noqa: F401  (before fastai: silences its torch.jit warning)
from xwlearn.norm.bn_theory import (PopulationNorm, PopulationNorm2d, recalibrate_population_norm, GammaDecay,
                                    PopulationRecalibration, bn_block_population, bn_pn_gap, predicted_coeffs,
                                    bn_noise_moments, derived_noise_moments, standardize)

torch.set_num_threads(1)


def _stats_layer(cls, c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = cls(c).to(dtype)
    m.running_mean.copy_(torch.randn(c, generator=g)); m.running_var.copy_(torch.rand(c, generator=g) + 0.3)
    m.weight.data.copy_(torch.randn(c, generator=g)); m.bias.data.copy_(torch.randn(c, generator=g))
    return m


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 7)])
def test_equals_batchnorm1d_eval(shape):
    bn = _stats_layer(nn.BatchNorm1d, 4).eval()
    pn = PopulationNorm(4); pn.load_state_dict(bn.state_dict(), strict=False)
    x = torch.randn(*shape) * 3 + 1
    torch.testing.assert_close(pn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pn.train()(x[:1]), bn(x[:1]), rtol=1e-5, atol=1e-5)  # no batch dependence in training


def test_equals_batchnorm2d_eval():
    bn = _stats_layer(nn.BatchNorm2d, 3).eval()
    pn = PopulationNorm2d(3); pn.load_state_dict(bn.state_dict(), strict=False)
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(pn(x), bn(x), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    pn = _stats_layer(PopulationNorm, 3, dtype=torch.float64)
    call = lambda x, w, b: torch.func.functional_call(pn, {'weight': w, 'bias': b}, (x,))
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(4, 3, 2), (3,), (3,)]]
    assert torch.autograd.gradcheck(call, args)


@pytest.mark.parametrize("cls,x,msg", [(PopulationNorm, torch.randn(2, 4), "channels"),
                                       (PopulationNorm, torch.randn(2, 3, 4, 4), "2-D or 3-D"),
                                       (PopulationNorm, torch.randn(3), "2-D or 3-D"),
                                       (PopulationNorm2d, torch.randn(2, 3, 4), "4-D")])
def test_shape_errors(cls, x, msg):
    with pytest.raises(ValueError, match=msg): cls(3)(x)


def test_bad_num_features():
    with pytest.raises(ValueError, match="num_features"): PopulationNorm(0)


def test_recalibration_exact_and_batch_independent():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), PopulationNorm(8), nn.ReLU(), nn.Linear(8, 8), PopulationNorm(8)).double()
    x = torch.randn(200, 6, dtype=torch.float64) * 2 + 0.5
    assert recalibrate_population_norm(net, x.split(33)) == 2
    h1 = net[0](x); h2 = net[3](net[2](net[1](h1)))
    for layer, h in [(net[1], h1), (net[4], h2)]:
        torch.testing.assert_close(layer.running_mean, h.mean(0))
        torch.testing.assert_close(layer.running_var, h.var(0, unbiased=False))
        z = (h - h.mean(0)) / h.std(0, unbiased=False)
        torch.testing.assert_close(layer.running_kurt, (z ** 4).mean(0) - 3)
    net2 = copy.deepcopy(net); recalibrate_population_norm(net2, [(x, None)])  # tuples: first item is the input
    for a, b in zip(net.modules(), net2.modules()):
        if isinstance(a, PopulationNorm): torch.testing.assert_close(a.running_var, b.running_var)
    assert net.training  # training mode restored
    with pytest.raises(ValueError, match="at least one batch"): recalibrate_population_norm(net, [])


def test_gamma_decay_gradient_is_analytic():
    from fastai.learner import Learner
    from fastai.optimizer import SGD
    from fastai.callback.core import Callback, CancelStepException, CancelEpochException
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (adds `Learner.no_bar`)
    from xwlearn.data import tensor_dls

    class Grab(Callback):
        order = 90
        def before_step(self):
            self.g = [m.weight.grad.clone() for m in self.learn.model.modules() if isinstance(m, PopulationNorm)]
            raise CancelStepException
        def after_batch(self):
            if self.training and self.iter >= 1: raise CancelEpochException

    def run(cbs):
        torch.manual_seed(0)
        x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        dls = tensor_dls(x, y, x[:16], y[:16], bs=32, seed=0, device='cpu')
        model = nn.Sequential(nn.Linear(5, 6), PopulationNorm(6), nn.ReLU(), nn.Linear(6, 3))
        model[1].weight.data.uniform_(0.5, 2)
        grab = Grab()
        learn = Learner(dls, model, opt_func=SGD, lr=0.1, cbs=[PopulationRecalibration(every=10**6)] + cbs + [grab])
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        return grab.g[0], model[1]

    g0, _ = run([])
    gd = GammaDecay(curvature=0.7)
    g1, layer = run([gd])
    zeta = 0.7 * (layer.running_kurt.clamp_min(-2) + 6) / 8 / 32
    torch.testing.assert_close(g1 - g0, 2 * zeta * layer.weight.detach())
    gs = GammaDecay(curvature=0.7, kurtosis=False, bs=10)                     # the simple λ·Σγ²/M form
    g2, layer = run([gs])
    torch.testing.assert_close(g2 - g0, 2 * 0.7 / 10 * layer.weight.detach())
    gf = GammaDecay('fisher')
    g3, layer = run([gf])
    torch.testing.assert_close(g3 - g0, 2 * gf.last_zeta[layer] * layer.weight.detach())
    assert (gf.last_zeta[layer] > 0).all()
    with pytest.raises(ValueError): GammaDecay('hessian')


def test_decomposition_gaussian_matches_derivation():
    h, t = bn_block_population('gauss', n=2**14)
    (mu, se), = bn_pn_gap(h, t, 32, [2.0], n_batches=4000)
    a, b, kappa = predicted_coeffs(h, t, 2.0, 0.2)
    assert abs(kappa) < 0.1
    assert abs(32 * mu - (2 * a + 4 * b)) < 4 * 32 * se + 0.03
    with pytest.raises(ValueError): bn_block_population('cauchy')


def test_kappa_and_skew_terms_directly():
    "The loss-free conditional moments of the BN perturbation carry the κ and s₃ terms as derived (M = 512)."
    heavy, _ = bn_block_population('heavy', n=2**15)
    skew, _ = bn_block_population('skew', n=2**15)
    z = standardize(skew)
    assert float((z**3).mean()) > 0.8 and abs(float((standardize(heavy)**3).mean())) < 0.1
    for h, idx in [(heavy, [0, 1, 2, 3, 4, 5]), (skew, [2, 4])]:           # skew: its s₃ coefficients (s₃/2 and s₃)
        est = bn_noise_moments(h, 512, n_el=2**20)
        mu, se, want = est.mean(0), est.std(0) / len(est) ** 0.5, derived_noise_moments(h)
        assert ((mu - want).abs() <= 0.1 + 2 * se)[idx].all(), (mu, want)
    assert derived_noise_moments(heavy)[1] > 1.3 > 0.75 + 0.1                # the κ term nearly doubles the Gaussian 3·2/8
    a, b, _ = predicted_coeffs(*bn_block_population('skew'), 3.0, 0.2)
    a0, b0, _ = predicted_coeffs(*bn_block_population('skew'), 3.0, 0.2, skew=False)
    assert abs((3 * a + 9 * b) - (3 * a0 + 9 * b0)) > 0.1                  # dropping s₃ changes the prediction
    with pytest.raises(ValueError, match="M must be"): bn_noise_moments(heavy, 1)


def test_spatial_effective_count_and_conv_gamma_decay():
    "Conv layers: M_c = B·k_c with k_c = Var(h)/Var(per-sample spatial mean), from the recalibration."
    torch.manual_seed(0)
    pn = PopulationNorm2d(3)
    recalibrate_population_norm(pn, [torch.randn(256, 3, 6, 6)])              # independent values: k ≈ H·W = 36
    assert ((pn.spatial_eff > 30) & (pn.spatial_eff <= 36)).all()
    gd = GammaDecay(curvature=1.0, kurtosis=False)
    torch.testing.assert_close(gd.zeta(pn, 8), 1 / (8 * pn.spatial_eff))
    torch.testing.assert_close(GammaDecay(curvature=1.0, kurtosis=False, spatial=False).zeta(pn, 8), torch.full((3,), 1 / 8))
    recalibrate_population_norm(pn, [torch.randn(256, 3, 1, 1).expand(-1, -1, 6, 6)])   # constant maps: k = 1
    torch.testing.assert_close(pn.spatial_eff, torch.ones(3))
    pn1 = PopulationNorm(3); recalibrate_population_norm(pn1, [torch.randn(64, 3)])
    assert pn1.spatial_eff.tolist() == [1., 1., 1.]


def test_stable_lr_rule_rejects_near_chance_loss():
    "A run at near-chance loss (2.27 < ln 10 = 2.30) is not stable; the fraction is checked."
    import math
    from xwlearn.repro.bn_theory import largest_stable_lr, STABLE_FRAC
    finals = {0.1: 1.2, 1.0: 2.27, 10.0: float('nan')}
    assert largest_stable_lr(finals) == 0.1 and STABLE_FRAC * math.log(10) < 2.27
    assert largest_stable_lr(finals, frac=1.0) == 1.0                          # the old rule
    assert largest_stable_lr({1.0: 2.0}) == 0.0
    with pytest.raises(ValueError, match="frac"): largest_stable_lr(finals, frac=0)


def test_imagenet_recipe_builds(tmp_path):
    "The ImageNet ResNet-18 recipe is registered and builds PN/BN models on an ImageFolder fixture."
    import numpy as np
    from xwlearn.data import write_imagefolder
    from xwlearn.core import get_recipe
    import xwlearn.repro.bn_theory  # noqa: F401  (registers the recipes)
    rng = np.random.default_rng(0)
    ims, ys = rng.integers(0, 255, (8, 40, 40, 3), dtype=np.uint8), np.arange(8) % 2
    for split in ('train', 'val'): write_imagefolder(tmp_path, ims, ys, ['a', 'b'], split=split)
    r = get_recipe('bn_theory_imagenet_resnet18')
    assert (r.paper, r.dataset, r.epochs) == ('bn_theory', 'imagenet', 90)
    learn = r.fn(tmp_path, epochs=1, smoke=True)
    assert sum(isinstance(m, PopulationNorm2d) for m in learn.model.modules()) == 20
    bn = r.fn(tmp_path, epochs=1, smoke=True, norm='bn')
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.model.modules()) == 20
    with pytest.raises(ValueError, match="norm must be"): r.fn(tmp_path, epochs=1, smoke=True, norm='ln')
