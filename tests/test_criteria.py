"""Pruning criteria (`xwlearn.prune.criteria`) against naive float64 numpy references, scipy, and error messages;
the reproduction's scoring groups (`xwlearn.repro.cwda`)."""
import numpy as np
import pytest
import torch
from torch import nn
from scipy.optimize import minimize

from xwlearn.prune.criteria import (CRITERIA, importance, weiszfeld, mardia, keep_mask, global_keep_masks, jaccard,
                                    chi_cv, remove_filters, mnist1d_cnn_groups, resnet_groups, PruneFilters)
from xwlearn.nets import mnist1d_cnn, cifar_resnet

torch.set_num_threads(1)


def naive(W, crit, med=None):
    W = np.asarray(W, dtype=np.float64).reshape(len(W), -1); n = len(W)
    if crit == 'l1': return np.array([sum(abs(v) for v in W[i]) for i in range(n)])
    if crit == 'l2': return np.array([np.sqrt(sum(v * v for v in W[i])) for i in range(n)])
    if crit == 'fpgm': return np.array([sum(np.sqrt(((W[i] - W[j]) ** 2).sum()) for j in range(n)) for i in range(n)])
    if crit == 'fermat': return np.array([np.sqrt(((W[i] - med) ** 2).sum()) for i in range(n)])


@pytest.mark.parametrize('shape', [(5, 3), (7, 2, 3), (6, 3, 3, 3), (5, 2, 1, 1)])
@pytest.mark.parametrize('crit', ['l1', 'l2', 'fpgm', 'fermat'])
def test_weight_criteria(shape, crit):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    F = w.reshape(shape[0], -1).numpy()
    med = minimize(lambda y: np.linalg.norm(F - y, axis=1).sum(), F.mean(0), method='BFGS',
                   options=dict(gtol=1e-10)).x if crit == 'fermat' else None
    np.testing.assert_allclose(importance(w, crit).numpy(), naive(w.numpy(), crit, med), rtol=1e-5, atol=1e-6)
    assert importance(w.float(), crit).dtype == torch.float32


def test_weiszfeld_vs_scipy():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((9, 4)); X[:2] += 6
    f = lambda y: np.linalg.norm(X - y, axis=1).sum()
    y_s = minimize(f, X.mean(0), method='BFGS', options=dict(gtol=1e-10)).x
    y_w = weiszfeld(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(y_w, y_s, atol=1e-5)
    assert f(y_w) <= f(y_s) + 1e-9
    # collinear odd count: median is the middle point
    P = torch.tensor([[0., 0], [1, 0], [5, 0]], dtype=torch.float64)
    np.testing.assert_allclose(weiszfeld(P).numpy(), [1, 0], atol=1e-6)


def test_bn_and_taylor():
    w = torch.randn(4, 3, 3)
    g = torch.tensor([0.5, -2.0, 0.0, 1.0])
    np.testing.assert_allclose(importance(w, 'bn', bn_weight=g).numpy(), np.abs(g.numpy()))
    a, gr = torch.randn(8, 4, 5, 5, dtype=torch.float64), torch.randn(8, 4, 5, 5, dtype=torch.float64)
    A, G = a.numpy(), gr.numpy()
    ref = np.array([np.mean([abs(np.mean(A[b, c] * G[b, c])) for b in range(8)]) for c in range(4)])
    np.testing.assert_allclose(importance(w, 'taylor', activation=a, grad=gr).numpy(), ref, rtol=1e-6)


def test_errors():
    w = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match="unknown criterion 'l0'; valid: l1, l2, fpgm, fermat, bn, taylor"): importance(w, 'l0')
    with pytest.raises(ValueError, match="rank ≥ 2"): importance(torch.randn(4), 'l1')
    with pytest.raises(ValueError, match="bn_weight"): importance(w, 'bn')
    with pytest.raises(ValueError, match="activation= and grad="): importance(w, 'taylor')
    with pytest.raises(ValueError, match="same shape"): importance(w, 'taylor', activation=torch.ones(2, 4, 3), grad=torch.ones(2, 4, 2))
    with pytest.raises(ValueError, match="ratio"): keep_mask(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="n=3, p=4"): mardia(np.ones((3, 4)))
    with pytest.raises(ValueError, match="supports"): PruneFilters([], 'taylor')
    assert set(CRITERIA) == {'l1', 'l2', 'fpgm', 'fermat', 'bn', 'taylor'}


def test_mardia_vs_naive():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 3)) @ np.array([[1, .5, 0], [0, 1, .3], [0, 0, 2.]])
    n, p = x.shape; xb = x.mean(0); S = sum(np.outer(v - xb, v - xb) for v in x) / n; Si = np.linalg.inv(S)
    m = np.array([[(x[i] - xb) @ Si @ (x[j] - xb) for j in range(n)] for i in range(n)])
    b1, b2 = (m ** 3).sum() / n ** 2, (np.diag(m) ** 2).sum() / n
    r = mardia(x)
    np.testing.assert_allclose([r['b1'], r['b2']], [b1, b2], rtol=1e-10)
    np.testing.assert_allclose(r['skew_stat'], n * b1 / 6); assert r['skew_df'] == 10
    np.testing.assert_allclose(r['kurt_stat'], (b2 - 15) / np.sqrt(8 * 15 / n))


def test_chi_cv():
    d = np.array([4, 64, 1024])
    np.testing.assert_allclose(chi_cv(d) * np.sqrt(2 * d), 1, atol=0.07)
    z = np.linalg.norm(np.random.default_rng(0).standard_normal((50000, 16)), axis=1)
    np.testing.assert_allclose(chi_cv(16), z.std() / z.mean(), rtol=0.02)


def test_masks():
    assert keep_mask(torch.tensor([3., 1, 2, 0]), 0.5).tolist() == [True, False, True, False]
    assert keep_mask(torch.tensor([1., 2]), 0.9).tolist() == [False, True]          # at least one kept
    m = global_keep_masks({'a': torch.tensor([10., 20]), 'b': torch.tensor([1., 2, 3])}, 0.6)
    assert m['b'].tolist() == [False, False, True] and m['a'].tolist() == [False, True]
    assert jaccard(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 0])) == 1.0


def test_remove_filters_sequential_and_resnet():
    torch.manual_seed(0)
    net = mnist1d_cnn(width=8).eval(); x = torch.randn(3, 1, 40)
    groups = mnist1d_cnn_groups(net)
    keeps = {c: keep_mask(importance(net.get_submodule(c).weight, 'l2'), 0.5) for c, _, _ in groups}
    masked = mnist1d_cnn(width=8).eval(); masked.load_state_dict(net.state_dict())
    with torch.no_grad():
        for c, b, _ in groups: masked.get_submodule(b).weight[~keeps[c]] = 0; masked.get_submodule(b).bias[~keeps[c]] = 0
    ref = masked(x).detach()
    orig = {c: net.get_submodule(c).weight.detach().clone() for c, _, _ in groups}
    for c, b, n in groups: remove_filters(net, c, keeps[c], b, n)
    for c, _, _ in groups: assert net.get_submodule(c).weight.shape[0] == 4
    # the first conv's kept filters are unchanged (later convs also lose input channels)
    torch.testing.assert_close(net.get_submodule('0').weight.detach(), orig['0'][keeps['0']])
    torch.testing.assert_close(net(x).detach(), ref, atol=1e-5, rtol=1e-5)
    r = cifar_resnet(20).eval()
    for c, b, n in resnet_groups(r): remove_filters(r, c, keep_mask(importance(r.get_submodule(c).weight, 'fpgm'), 0.25), b, n)
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="keep must be"): remove_filters(r, 'blocks.0.conv1', torch.ones(3, dtype=torch.bool))


def test_henze_zirkler_closed_form_equals_integral():
    "p = 1: the closed form equals n ∫ |ψ_n(t) − e^{−t²/2}|² φ_β(t) dt by quadrature."
    from scipy.integrate import quad
    from xwlearn.prune.criteria import henze_zirkler
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 1)) * 2 + 1
    h = henze_zirkler(x); b = h['beta']
    y = ((x - x.mean()) / x.std())[:, 0]
    f = lambda t: abs(np.exp(1j * t * y).mean() - np.exp(-t * t / 2)) ** 2 * np.exp(-t * t / (2 * b * b)) / np.sqrt(2 * np.pi * b * b)
    np.testing.assert_allclose(h['stat'], 30 * quad(f, -np.inf, np.inf, limit=200)[0], rtol=1e-6)
    np.testing.assert_allclose(b, ((3 * 30 / 4) ** (1 / 5)) / np.sqrt(2))


def test_henze_zirkler_null_and_power():
    from xwlearn.prune.criteria import henze_zirkler
    rng = np.random.default_rng(4)
    T = np.array([henze_zirkler(rng.standard_normal((40, 2)))['stat'] for _ in range(300)])
    r = henze_zirkler(rng.standard_normal((40, 2)))
    assert abs(T.mean() - r['null_mean']) < 0.05 * r['null_mean']
    assert henze_zirkler(rng.exponential(size=(300, 2)))['p'] < 1e-6
    affine = rng.standard_normal((50, 3)); A = np.array([[2., .3, 0], [0, 1, .5], [0, 0, 3]])
    np.testing.assert_allclose(henze_zirkler(affine @ A + 5)['stat'], henze_zirkler(affine)['stat'], rtol=1e-8)  # affine invariant
    with pytest.raises(ValueError, match="n=3, p=5"): henze_zirkler(np.ones((3, 5)))


def test_gaussianity_2d_kernels_and_score_groups():
    from xwlearn.prune.criteria import gaussianity
    from xwlearn.repro.cwda import resnet_score_groups
    g = gaussianity(torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0)), max_taps=300)
    assert g['k'] == 9 and g['n_taps'] == 300 and g['d'] == 144 and g['hz_taps'] is not None
    net = cifar_resnet(8)
    groups = resnet_score_groups(net)
    assert groups[0] == ('stem.0', 'stem.1', None) and len(groups) == 7
    assert all(isinstance(net.get_submodule(c), nn.Conv2d) and isinstance(net.get_submodule(b), nn.BatchNorm2d) for c, b, _ in groups)


def test_global_masks_l2_normalised_per_layer():
    "Molchanov et al.'s per-layer ℓ2 normalisation: masks equal a global ranking of s/‖s‖ and ignore per-layer rescaling."
    g = torch.Generator().manual_seed(5)
    sc = {'a': torch.rand(7, generator=g) * 100, 'b': torch.rand(5, generator=g), 'c': torch.rand(9, generator=g) * 3}
    m = global_keep_masks(sc, 0.4, normalize='l2')
    allv = torch.cat([v.double() / v.double().norm() for v in sc.values()])
    pruned = set(torch.argsort(allv)[:round(0.4 * 21)].tolist())
    assert torch.cat(list(m.values())).tolist() == [i not in pruned for i in range(21)]
    m2 = global_keep_masks({k: v * s for (k, v), s in zip(sc.items(), (1e-4, 1e3, 1.))}, 0.4, normalize='l2')
    assert all(torch.equal(m[k], m2[k]) for k in sc)
    assert not torch.equal(global_keep_masks(sc, 0.4)['a'], m['a'])        # raw: the large-scale layer keeps everything
    with pytest.raises(ValueError, match="normalize must be None or 'l2'"): global_keep_masks(sc, 0.4, normalize='max')


def test_cwda_statistics_values_and_alternatives():
    from xwlearn.prune.criteria import cwda_statistics, cwda_surrogate
    ref = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    W = ref.reshape(64, -1).numpy(); n, d = W.shape
    cos = [W[i] @ W[j] / np.linalg.norm(W[i]) / np.linalg.norm(W[j]) for i in range(n) for j in range(i + 1, n)]
    dist = [np.linalg.norm(W[i] - W[j]) for i in range(n) for j in range(i + 1, n)]
    r = cwda_statistics(ref)
    np.testing.assert_allclose(r['ortho'], np.sqrt(np.mean(np.square(cos)) * d), rtol=1e-10)
    np.testing.assert_allclose(r['equidistance'], np.std(dist) / np.mean(dist) / chi_cv(d), rtol=1e-10)
    nrm = np.linalg.norm(W, axis=1); np.testing.assert_allclose(r['cv_ratio'], nrm.std() / nrm.mean() / chi_cv(d), rtol=1e-10)
    assert abs(r['kurtosis']) < 0.3 and all(abs(r[k] - 1) < 0.15 for k in ('cv_ratio', 'ortho', 'equidistance'))
    sur = {k: cwda_surrogate(ref, k, seed=1) for k in ('gauss', 'laplace', 'mixture')}
    for k, w in sur.items():
        assert w.shape == ref.shape and w.dtype == ref.dtype
        np.testing.assert_allclose(w.pow(2).mean().sqrt().item(), 0.1, rtol=0.05)      # same mean square
    lap, mix = cwda_statistics(sur['laplace']), cwda_statistics(sur['mixture'])
    assert lap['kurtosis'] > 1.5 and lap['cv_ratio'] > 1.3 and mix['cv_ratio'] > 3 and mix['equidistance'] > 2
    mv = cwda_statistics(ref * 0.2 + sur['gauss'], init=ref)
    np.testing.assert_allclose(mv['init_share'], 0.04 / 1.04, atol=0.02)                 # cos²(W, W₀) ≈ 0.2²/(0.2² + 1)
    with pytest.raises(ValueError, match="init must have the weight's shape"): cwda_statistics(ref, init=ref[:3])
    with pytest.raises(ValueError, match="at least 3 filters"): cwda_statistics(ref[:2])
    with pytest.raises(ValueError, match="kind must be"): cwda_surrogate(ref, 'cauchy')
