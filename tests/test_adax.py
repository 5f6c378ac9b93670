"""AdaX / AdaX-W (`xwlearn.optim.adax`) against independent naive references; `xwlearn.repro.adax` registers the rest.

The references below are written from the official code (switchablenorms/AdaX, `AdaX.py`) in float64 with the naive,
growing state v_t — deliberately not sharing any helper with the module under test.
"""
import copy, io, math, re, warnings
from decimal import Decimal, getcontext
from functools import partial

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st, HealthCheck

from xwlearn.optim.adax import AdaX, AdaXW, AdaXOpt, adax_beta2_hat, adax_eps_hat, log_adax_bias_correction

torch.set_num_threads(1)


def official(theta, grads, lr, beta1, beta2, eps, wd, decoupled, return_state=False):
    "The official AdaX (L2) / AdaX-W (decoupled) update, float64, naive state v_t (`return_state`: also the final m, v)."
    theta = theta.double(); m = torch.zeros_like(theta); v = torch.zeros_like(theta); out = []
    for t, g in enumerate(grads, 1):
        g = g.double()
        if wd and not decoupled: g = g + wd * theta
        m = beta1 * m + (1 - beta1) * g
        v = (1 + beta2) * v + beta2 * g * g
        step_size = lr * math.sqrt((1 + beta2) ** t - 1)
        if wd and decoupled: theta = theta * (1 - lr * wd)
        theta = theta - step_size * m / (v.sqrt() + eps)
        out.append(theta)
    return (out, m, v) if return_state else out


def run(opt_fn, thetas, grads, dtype=torch.float64):
    "Feed fixed gradients (grads[step][param]) to an optimizer over several parameters; return the iterates."
    ps = [nn.Parameter(th.to(dtype).clone()) for th in thetas]
    opt = opt_fn(ps); out = []
    for gs in grads:
        for p, g in zip(ps, gs): p.grad = g.to(dtype).clone()
        opt.step(); out.append([p.detach().clone() for p in ps])
    return out


shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)


@pytest.mark.filterwarnings("ignore::xwlearn.optim.adax.AdaXBeta2Warning")   # β₂ up to 0.5 on purpose
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, lr=st.floats(1e-4, 0.1), beta1=st.floats(0.0, 0.99), beta2=st.floats(1e-6, 0.5),
       wd=st.sampled_from([0.0, 5e-4, 5e-2, 0.3]), decoupled=st.booleans(), steps=st.integers(1, 20),
       foreach=st.booleans(), seed=st.integers(0, 2**16))
@example(shapes=[(1,), (1,), (4, 4)], lr=0.064453125, beta1=0.0, beta2=1e-06, wd=0.0, decoupled=False, steps=12,
         foreach=False, seed=0)  # tiny β₂: the float64 reference's own cancellation error (see the tolerance below)
def test_matches_official_float64(shapes, lr, beta1, beta2, wd, decoupled, steps, foreach, seed):
    g = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * (20 if torch.rand(1, generator=g) < 0.1 else 1)
              for s in shapes] for _ in range(steps)]
    out = run(partial(AdaX, lr=lr, betas=(beta1, beta2), weight_decay=wd, decoupled_weight_decay=decoupled,
                      foreach=foreach), thetas, grads)
    for i, th in enumerate(thetas):
        ref = official(th, [gs[i] for gs in grads], lr, beta1, beta2, 1e-12, wd, decoupled)
        # The official form computes (1+β₂)^t − 1 directly: in float64 that cancels to ~1e-16/(tβ₂) relative error,
        # so the reference itself is only that accurate for tiny β₂ (hypothesis found 7e-9 at β₂ = 1e-6).
        tol = max(1e-9, 1e-13 / beta2)
        for t in range(steps): torch.testing.assert_close(out[t][i], ref[t], rtol=tol, atol=tol * 1e-2)


def test_adaxw_defaults_and_float32():
    torch.manual_seed(0)
    th = torch.randn(4, 3); grads = [[torch.randn(4, 3)] for _ in range(30)]
    out = run(AdaXW, [th], grads, dtype=torch.float32)
    ref = official(th, [g[0] for g in grads], 5e-3, 0.9, 1e-4, 1e-12, 5e-2, True)
    torch.testing.assert_close(out[-1][0], ref[-1].float(), rtol=1e-5, atol=1e-6)
    d = AdaXW([nn.Parameter(torch.zeros(1))]).defaults
    assert (d['lr'], d['betas'], d['eps'], d['weight_decay'], d['decoupled_weight_decay']) == (5e-3, (0.9, 1e-4), 1e-12, 5e-2, True)
    d = AdaX([nn.Parameter(torch.zeros(1))]).defaults
    assert (d['lr'], d['betas'], d['eps'], d['weight_decay'], d['decoupled_weight_decay']) == (1.5e-3, (0.9, 1e-4), 1e-12, 5e-4, False)


def test_param_groups_differ():
    torch.manual_seed(1)
    thetas = [torch.randn(5, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    grads = [[torch.randn_like(t) for t in thetas] for _ in range(10)]
    kws = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.5, 1e-3), weight_decay=0.0)]
    out = run(lambda ps: AdaXW([dict(params=[p], **kw) for p, kw in zip(ps, kws)]), thetas, grads)
    for i, (th, kw) in enumerate(zip(thetas, kws)):
        b1, b2 = kw.get('betas', (0.9, 1e-4))
        ref = official(th, [gs[i] for gs in grads], kw['lr'], b1, b2, 1e-12, kw['weight_decay'], True)
        torch.testing.assert_close(out[-1][i], ref[-1], rtol=1e-10, atol=1e-12)


def test_equivalent_adam_form_1000_steps():
    "AdaX-W == an Adam-style EMA with β̂₂,t = 1 − β₂/((1+β₂)^t − 1), no bias correction of m."
    torch.manual_seed(2)
    lr, b1, b2, eps, wd = 5e-3, 0.9, 1e-4, 1e-12, 5e-2
    th0 = torch.randn(64, dtype=torch.float64)
    grads = [torch.randn(64, dtype=torch.float64) * (10 if i % 50 == 0 else 1) for i in range(1000)]
    th, m, vh = th0.clone(), torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        bt = 1 - b2 / ((1 + b2) ** t - 1)
        m = b1 * m + (1 - b1) * g
        vh = bt * vh + (1 - bt) * g * g
        th = th * (1 - lr * wd) - lr * m / (vh.sqrt() + eps / math.sqrt((1 + b2) ** t - 1))
    out = run(AdaXW, [th0], [[g] for g in grads])
    torch.testing.assert_close(out[-1][0], th, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[-1][0], official(th0, grads, lr, b1, b2, eps, wd, True)[-1], rtol=0, atol=1e-6)


def _bc_decimal(t, beta2):
    "(1+β₂)^t − 1 in 60-digit decimal arithmetic (an independent reference for huge t)."
    getcontext().prec = 60
    return (Decimal(1) + Decimal(repr(beta2))) ** t - 1


@pytest.mark.parametrize("t", [1, 2, 37, 10_000, 10**6, 10**7, 10**8])
def test_scalars_stable(t):
    bc = _bc_decimal(t, 1e-4)
    assert math.isclose(log_adax_bias_correction(t, 1e-4), float(bc.ln()), rel_tol=1e-12)
    w = float(Decimal(repr(1e-4)) / bc)                      # 1 − β̂₂,t: to float64's absolute resolution near 1
    assert abs((1 - adax_beta2_hat(t, 1e-4)) - w) <= 4.5e-16 and 0 <= adax_beta2_hat(t, 1e-4) <= 1
    assert math.isclose(adax_eps_hat(t, 1e-4, 1e-12), float(Decimal(repr(1e-12)) / bc.sqrt()), rel_tol=1e-9, abs_tol=1e-300)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("t0", [10**6, 3 * 10**6, 10**7])
def test_overflow_safe_after_state_jump(t0, foreach):
    "At t0 the official float32 state (1+β₂)^t·v̂ is inf (and for 1e7 even float64 overflows); ours stays exact."
    assert torch.isinf(torch.tensor(1 + 1e-4, dtype=torch.float32) ** t0)        # the naive fp32 state would be inf
    torch.manual_seed(3)
    th, m0, vh0 = torch.randn(40), torch.randn(40) * 0.1, torch.rand(40) + 0.5
    grads = [torch.randn(40) for _ in range(4)]
    p = nn.Parameter(th.clone()); opt = AdaXW([p], foreach=foreach)
    p.grad = torch.zeros_like(p); opt.step()
    s = opt.state[p]; s['step'].fill_(t0); s['exp_avg'].copy_(m0); s['exp_avg_sq'].copy_(vh0); p.data.copy_(th)
    for g in grads: p.grad = g.clone(); opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(s['exp_avg_sq']).all()
    assert s['exp_avg_sq'].max() <= max(vh0.max(), max(g.abs().max() ** 2 for g in grads)) + 1e-6
    # reference: the official update in 60-digit decimals from v = ((1+β₂)^t0 − 1)·v̂ (never overflows)
    getcontext().prec = 60
    lr, b1, b2, eps, wd = (Decimal(repr(x)) for x in (5e-3, 0.9, 1e-4, 1e-12, 5e-2))
    ref = []
    for i in range(40):
        x, m, v = Decimal(repr(th[i].item())), Decimal(repr(m0[i].item())), Decimal(repr(vh0[i].item())) * _bc_decimal(t0, 1e-4)
        for k, g in enumerate(grads, 1):
            gi = Decimal(repr(g[i].item())); m = b1 * m + (1 - b1) * gi; v = (1 + b2) * v + b2 * gi * gi
            x = x * (1 - lr * wd) - lr * _bc_decimal(t0 + k, 1e-4).sqrt() * m / (v.sqrt() + eps)
        ref.append(float(x))
    torch.testing.assert_close(p.detach(), torch.tensor(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,name", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(-0.1, 1e-4)), "betas[0]"), (dict(betas=(1.0, 1e-4)), "betas[0]"),
    (dict(betas=(0.9, -1e-4)), "betas[1]"), (dict(betas=(0.9, 0.0)), "betas[1]"), (dict(betas=(0.9, 1.0)), "betas[1]"),
    (dict(eps=-1e-12), "eps"), (dict(weight_decay=-5e-2), "weight_decay"),
    (dict(lr=torch.tensor(-1e-3)), "lr"), (dict(lr=math.inf), "lr"), (dict(lr=torch.tensor(math.inf)), "lr"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "lr"), (dict(eps=math.inf), "eps"), (dict(weight_decay=math.inf), "weight_decay")])
@pytest.mark.parametrize("cls", [AdaX, AdaXW])
def test_invalid_hyperparameters(cls, kw, name):
    ps = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=re.escape(name)): cls(ps, **kw)
    with pytest.raises(ValueError, match=re.escape(name)): cls([dict(params=ps, **kw)])


def test_fastai_invalid_hyperparameters():
    with pytest.raises(ValueError, match="wd"): AdaXOpt([nn.Parameter(torch.zeros(1))], wd=-1.0)
    with pytest.raises(ValueError, match="sqr_mom"): AdaXOpt([nn.Parameter(torch.zeros(1))], sqr_mom=0.0)
    with pytest.raises(ValueError, match="lr"): AdaXOpt([nn.Parameter(torch.zeros(1))], lr=math.inf)
    with pytest.raises(ValueError, match="eps"): AdaXOpt([nn.Parameter(torch.zeros(1))], eps=math.inf)


def test_adam_style_beta2_warns():
    from xwlearn.optim.adax import AdaXBeta2Warning
    ps = [nn.Parameter(torch.zeros(2))]
    for make, name in [(lambda: AdaX(ps, betas=(0.9, 0.999)), "betas[1]"), (lambda: AdaXW([dict(params=ps, betas=(0.9, 0.999))]), "betas[1]"),
                       (lambda: AdaXOpt(ps, sqr_mom=0.99), "sqr_mom[1]")]:
        with pytest.warns(AdaXBeta2Warning) as rec: make()
        assert len(rec) == 1 and name in str(rec[0].message) and "1e-4" in str(rec[0].message), [str(r.message) for r in rec]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the official defaults and small β₂ are silent
        AdaX(ps); AdaXW(ps, betas=(0.9, 1e-3)); AdaXOpt(ps)
        warnings.simplefilter("ignore", AdaXBeta2Warning); AdaX(ps, betas=(0.9, 0.5))   # a sweep silences it


@pytest.mark.parametrize("make", [lambda ps: AdaX(ps), lambda ps: AdaXW([dict(params=ps)]), lambda ps: AdaXOpt(ps),
                                  lambda ps: AdaXOpt([ps])])
def test_complex_parameters_refused(make):
    ps = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
    with pytest.raises(TypeError, match=r"params.*\[1\] is complex \(torch.complex64"): make(ps)


def test_generator_params_still_accepted():
    m = nn.Linear(3, 2)
    assert len(AdaX(m.parameters()).param_groups[0]['params']) == 2
    assert len(AdaX([dict(params=m.parameters())]).param_groups[0]['params']) == 2
    assert len(AdaXOpt(m.parameters()).param_lists[0]) == 2


def _train(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()


@pytest.mark.parametrize("cls", [AdaX, AdaXW])
def test_state_dict_round_trip(cls):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = cls([dict(params=model[0].parameters(), lr=1e-2), dict(params=model[2].parameters())])
    _train(model, opt, x, y, 5)
    buf = io.BytesIO(); torch.save(dict(model=model.state_dict(), opt=opt.state_dict()), buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)); model2.load_state_dict(ck['model'])
    opt2 = cls([dict(params=model2[0].parameters(), lr=1e-2), dict(params=model2[2].parameters())])
    assert all(s['format'] == 'xwlearn-adax-vhat' for s in ck['opt']['state'].values())   # the tag survives weights_only
    opt2.load_state_dict(ck['opt'])
    assert opt2.param_groups[0]['lr'] == 1e-2 and opt2.state[next(model2.parameters())]['step'].item() == 5
    assert all(s['format'] == 'xwlearn-adax-vhat' for s in opt2.state.values())
    _train(model, opt, x, y, 5); _train(model2, opt2, x, y, 5)
    for p, q in zip(model.parameters(), model2.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_closure_and_missing_grads():
    torch.manual_seed(5)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = AdaXW([a, b])
    b0 = b.detach().clone()
    def closure():
        opt.zero_grad(); loss = (a ** 2).sum(); loss.backward(); return loss
    losses = [opt.step(closure).item() for _ in range(50)]
    assert losses[-1] < losses[0]
    assert torch.equal(b.detach(), b0) and len(opt.state[b]) == 0   # no grad: untouched, no state


@pytest.mark.parametrize("decouple", [True, False])
def test_fastai_steppers_match_torch(decouple):
    torch.manual_seed(6)
    ma = nn.Sequential(nn.Linear(5, 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4)).double()
    mb = copy.deepcopy(ma)
    oa = AdaXOpt(list(ma.parameters()), lr=1e-2, wd=1e-2, decouple_wd=decouple)
    ob = AdaX(mb.parameters(), lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=decouple)
    for _ in range(10):
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,))
        for m, o in ((ma, oa), (mb, ob)): o.zero_grad(); F.cross_entropy(m(x), y).backward(); o.step()
        for p, q in zip(ma.parameters(), mb.parameters()): torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_fastai_defaults():
    o = AdaXOpt([nn.Parameter(torch.zeros(2))])
    h = o.hypers[0]
    assert (h['lr'], h['mom'], h['sqr_mom'], h['eps'], h['wd']) == (5e-3, 0.9, 1e-4, 1e-12, 5e-2)
    h = AdaXOpt([nn.Parameter(torch.zeros(2))], decouple_wd=False).hypers[0]
    assert (h['lr'], h['wd']) == (1.5e-3, 5e-4)


def test_registered():
    from xwlearn.core import REPRODUCTIONS, RECIPES
    from xwlearn.repro.adax import resnet20   # the reproduction module registers the reproduction and the recipes
    assert REPRODUCTIONS['adax'].paper == 'adax'
    assert {'adax_cifar10_resnet20', 'adax_imagenet_resnet18'} <= set(RECIPES)
    assert sum(p.numel() for p in resnet20().parameters()) == 269_722


def _official_state_dict(m, v, step, lr, betas, wd):
    "What the official AdaX.py's `state_dict()` holds: int step, the growing v, four-key param_groups; via torch.save."
    sd = {'state': {0: {'step': step, 'exp_avg': m.clone(), 'exp_avg_sq': v.clone()}},
          'param_groups': [dict(lr=lr, betas=betas, eps=1e-12, weight_decay=wd, params=[0])]}
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls,decoupled,wd", [(AdaXW, True, 5e-2), (AdaX, False, 5e-4)])
@pytest.mark.parametrize("n", [1, 9])
def test_resume_from_official_state(cls, decoupled, wd, n):
    "The official state (v_t) converts to v̂_t: resuming continues the official float64 reference exactly."
    torch.manual_seed(7)
    lr, b1, b2 = 5e-3, 0.9, 1e-4
    th0 = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) * (10 if i % 5 == 0 else 1) for i in range(n + 4)]
    ref = official(th0, grads, lr, b1, b2, 1e-12, wd, decoupled)
    _, m, v = official(th0, grads[:n], lr, b1, b2, 1e-12, wd, decoupled, return_state=True)
    sd = _official_state_dict(m, v, n, lr, (b1, b2), wd)
    p = nn.Parameter(ref[n - 1].clone()); opt = cls([p], lr=1e-3, weight_decay=0.1)   # options from the state, except wd type
    opt.load_state_dict(sd)
    assert torch.equal(sd['state'][0]['exp_avg_sq'], v)                  # the caller's dict is not modified
    s, g = opt.state[p], opt.param_groups[0]
    assert s['format'] == 'xwlearn-adax-vhat' and s['step'].item() == n and torch.is_tensor(s['step'])
    assert (g['lr'], g['weight_decay'], g['decoupled_weight_decay']) == (lr, wd, decoupled)
    torch.testing.assert_close(s['exp_avg_sq'], v / ((1 + b2) ** n - 1), rtol=1e-12, atol=0)
    for k in range(n, len(grads)):
        p.grad = grads[k].clone(); opt.step()
        torch.testing.assert_close(p.detach(), ref[k], rtol=1e-10, atol=1e-12)


def test_adam_state_refused():
    torch.manual_seed(8)
    q = nn.Parameter(torch.randn(5)); adam = torch.optim.Adam([q]); q.grad = torch.randn(5); adam.step()
    for sd in (adam.state_dict(), torch.optim.AdamW([q]).state_dict() | {'state': adam.state_dict()['state']}):
        with pytest.raises(ValueError, match=r"betas'\]\[1\] = 0.999.*Adam state"): AdaXW([q]).load_state_dict(sd)
    sd = adam.state_dict(); sd['param_groups'][0]['betas'] = (0.9, 1e-4)      # Adam's amsgrad option still gives it away
    with pytest.raises(ValueError, match="Adam state"): AdaX([q]).load_state_dict(sd)
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9); sgd.step()
    with pytest.raises(ValueError, match="not an AdaX state"): AdaX([q]).load_state_dict(sgd.state_dict())
    ours = AdaXW([q]); ours.step(); sd = ours.state_dict(); sd['state'][0]['format'] = 'something-else'
    with pytest.raises(ValueError, match="'something-else'"): AdaXW([q]).load_state_dict(sd)
    # fastai: Adam's stepper state (sqr_mom 0.99) is refused by AdaXOpt; an AdaXOpt state loads
    from fastai.optimizer import Adam as FastaiAdam
    fa = FastaiAdam([q], lr=1e-3); fa.step()
    with pytest.raises(ValueError, match=r"sqr_mom'\] = 0.99.*not an AdaX state"): AdaXOpt([q]).load_state_dict(fa.state_dict())
    ax = AdaXOpt([q]); ax.step(); assert ax.state[q]['format'] == 'xwlearn-adax-vhat'
    ax2 = AdaXOpt([q]); ax2.load_state_dict(copy.deepcopy(ax.state_dict())); assert ax2.state[q]['format'] == 'xwlearn-adax-vhat'


def test_untagged_xwlearn_state_still_loads():
    "A state saved by this class before the format tag (our param_groups, no tag) is v̂ already: loaded as is."
    torch.manual_seed(9)
    a = nn.Parameter(torch.randn(4)); opt = AdaXW([a])
    for _ in range(3): a.grad = torch.randn(4); opt.step()
    sd = copy.deepcopy(opt.state_dict()); del sd['state'][0]['format']
    b = nn.Parameter(a.detach().clone()); opt2 = AdaXW([b]); opt2.load_state_dict(sd)
    g = torch.randn(4); a.grad, b.grad = g.clone(), g.clone(); opt.step(); opt2.step()
    assert torch.equal(a, b) and opt2.state[b]['format'] == 'xwlearn-adax-vhat'


def _bf16_fused_run(n=4, seed=11):
    "A non-contiguous bf16 parameter (the kernel refuses it anywhere: the loop path) under AdaXW(fused=True) for n steps."
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(6, 5, generator=g).bfloat16().t())
    grads = [torch.randn(5, 6, generator=g).bfloat16() * (10 if k % 3 == 0 else 1) for k in range(n)]
    opt = AdaXW([p], fused=True)
    for gr in grads: p.grad = gr.clone(); opt.step()
    return p, opt, grads


def test_fused_fallback_low_precision_computes_in_fp32():
    "fused=True with a bf16 θ keeps fp32 m, v̂; where the kernel can't run, the loop computes in fp32 and rounds θ once."
    p, opt, grads = _bf16_fused_run()
    assert opt.state[p]['exp_avg'].dtype == torch.float32 and opt.state[p]['exp_avg_sq'].dtype == torch.float32
    r = nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(11)).bfloat16().t().float())
    ref = AdaXW([r])                                                     # fp32 reference, θ rounded to bf16 after each step
    for gr in grads:
        r.grad = gr.float(); ref.step()
        with torch.no_grad(): r.copy_(r.bfloat16().float())
    assert torch.equal(p.detach().float(), r.detach())
    assert torch.equal(opt.state[p]['exp_avg_sq'], ref.state[r]['exp_avg_sq'])


def test_fused_low_precision_state_survives_load():
    "torch's loader casts saved state to θ's dtype (bf16); AdaX.load_state_dict restores the saved fp32 m, v̂ and a CPU step."
    g = torch.Generator().manual_seed(12)
    q = nn.Parameter(torch.randn(4, 7, generator=g).bfloat16()); opt = AdaXW([q], fused=True)
    m, v = torch.randn(4, 7, generator=g) / 3, torch.rand(4, 7, generator=g) + 0.1   # fp32 values bf16 can't hold
    sd = opt.state_dict() | {'state': {0: dict(step=torch.tensor(5.0), exp_avg=m, exp_avg_sq=v, format='xwlearn-adax-vhat')}}
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0); opt.load_state_dict(torch.load(buf, weights_only=True))
    s = opt.state[q]
    for k, x in (('exp_avg', m), ('exp_avg_sq', v)): assert s[k].dtype == torch.float32 and torch.equal(s[k], x)
    assert s['step'].device.type == 'cpu' and s['step'].dtype == torch.float32 and s['format'] == 'xwlearn-adax-vhat'
    # a mid-run save/load (the loop path here) continues the same trajectory
    p, opt, _ = _bf16_fused_run()
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    r = nn.Parameter(p.detach().clone()); opt2 = AdaXW([r], fused=True); opt2.load_state_dict(torch.load(buf, weights_only=True))
    gr = torch.randn(5, 6).bfloat16(); p.grad, r.grad = gr.clone(), gr.clone(); opt.step(); opt2.step()
    assert torch.equal(p, r) and torch.equal(opt.state[p]['exp_avg_sq'], opt2.state[r]['exp_avg_sq'])
