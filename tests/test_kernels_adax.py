"""Fused AdaX step (`xwlearn.kernels.adax`, `AdaX(..., fused=True)`) against the reference `xwlearn.optim.AdaX`.

CPU: the Triton interpreter (TRITON_INTERPRET=1, small shapes). CUDA (when available): compiled kernels, realistic sizes.
"""
import importlib, os
from functools import partial

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA: os.environ["TRITON_INTERPRET"] = "1"          # before the kernels are defined (reloaded below if needed)
import xwlearn.kernels.adax as K
if not CUDA and not K._INTERPRET: K = importlib.reload(K)  # imported earlier in this process without the interpreter
from xwlearn.optim.adax import AdaX, AdaXW, adax_beta2_hat, adax_eps_hat

torch.set_num_threads(1)
DEVS = [pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="interpreter variant runs on CPU-only machines")),
        pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU"))]


def shapes_for(dev):
    return [(1,), (37,), (3, 300), (1500,)] if dev == "cpu" else [(1,), (1000,), (3, 4097), (2**20 + 5,), (256, 1024)]


def run(opt_fn, shapes, dev, steps=60, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dev, dtype)) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * (20 if k % 9 == 0 else 1)).to(dev, dtype) for s in shapes] for k in range(steps)]
    opt = opt_fn([dict(params=ps[:2]), dict(params=ps[2:], lr=3e-3, betas=(0.8, 3e-4))])
    for gs in grads:
        for p, gr in zip(ps, gs): p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in ps], opt


@pytest.fixture(autouse=True)
def _cfg():
    saved = dict(K.ADAX_KERNEL_CONFIG)
    if K._INTERPRET and not CUDA: K.ADAX_KERNEL_CONFIG.update(block=8192, chunk=8192)  # fewest interpreted programs
    yield
    K.ADAX_KERNEL_CONFIG.update(saved)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("variant", ["adaxw", "adax_l2", "no_wd"])
def test_fused_matches_reference_60_steps(dev, variant):
    cls = {"adaxw": AdaXW, "adax_l2": partial(AdaX, weight_decay=5e-4), "no_wd": partial(AdaX, weight_decay=0.0)}[variant]
    shapes = shapes_for(dev)
    ref, _ = run(partial(cls, foreach=False), shapes, dev)
    fus, opt = run(partial(cls, fused=True), shapes, dev)
    for a, b in zip(fus, ref): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[opt.param_groups[1]["params"][0]]["step"].item() == 60


@pytest.mark.parametrize("dev", DEVS)
def test_one_step_chunks_and_decay_variants(dev):
    "Several chunks per tensor (small chunk), every weight-decay variant, fp32 and bf16, vs `adax_step_ref`."
    shapes = shapes_for(dev); g = torch.Generator().manual_seed(1)
    kw = dict(lr=1e-2, beta1=0.9, beta2_hat=adax_beta2_hat(7, 1e-4), eps_hat=adax_eps_hat(7, 1e-4, 1e-12))
    for dtype in (torch.float32, torch.bfloat16):
        for wd, dec in [(0.0, False), (5e-2, True), (5e-4, False)]:
            a = [[torch.randn(s, generator=g).to(dev, dtype) for s in shapes] for _ in range(2)] + \
                [[torch.rand(s, generator=g).to(dev) for s in shapes] for _ in range(2)]
            b = [[t.clone() for t in ts] for ts in a]
            K.adax_fused_step(*a, **kw, weight_decay=wd, decoupled=dec, block=256, chunk=1024)
            K.adax_step_ref(*b, **kw, weight_decay=wd, decoupled=dec)
            for xs, ys in zip(a, b):
                for x, y in zip(xs, ys):
                    torch.testing.assert_close(x.float(), y.float(), rtol=1e-6 if dtype == torch.float32 else 2**-7, atol=1e-6)


def _round_bf16(x):
    "fp32 -> bf16 as the executing device does: the Triton interpreter truncates (triton 3.8), GPUs round to nearest even."
    if x.is_cuda: return x.bfloat16()
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()


@pytest.mark.parametrize("dev", DEVS)
def test_bf16_params_fp32_state(dev):
    "bf16 θ, fp32 m and v̂: equals the reference update on an fp32 copy of θ rounded to bf16 after every step."
    shapes = shapes_for(dev)[:3]; steps = 30
    g = torch.Generator().manual_seed(3)
    p0 = [torch.randn(s, generator=g).to(dev, torch.bfloat16) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * (20 if k % 9 == 0 else 1)).to(dev, torch.bfloat16) for s in shapes] for k in range(steps)]
    ps = [torch.nn.Parameter(p.clone()) for p in p0]; opt = AdaXW(ps, fused=True)
    for gs in grads:
        for p, gr in zip(ps, gs): p.grad = gr
        opt.step()
    st = opt.state[ps[0]]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    ref = [p.clone() for p in p0]; ms = [torch.zeros(s, device=dev) for s in shapes]; vs = [torch.zeros(s, device=dev) for s in shapes]
    for t, gs in enumerate(grads, 1):
        p32 = [p.float() for p in ref]
        K.adax_step_ref(p32, [x.float() for x in gs], ms, vs, lr=5e-3, beta1=0.9, beta2_hat=adax_beta2_hat(t, 1e-4),
                        eps_hat=adax_eps_hat(t, 1e-4, 1e-12), weight_decay=5e-2, decoupled=True)
        ref = [_round_bf16(p) for p in p32]
    for a, b in zip(ps, ref): torch.testing.assert_close(a.detach().float(), b.float(), rtol=2**-6, atol=1e-6)  # ≤ ~2 bf16 ulps (FMA contraction may differ)
    for a, b in zip(ms, [opt.state[p]["exp_avg"] for p in ps]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dev", DEVS)
def test_non_contiguous_falls_back(dev):
    "A transposed parameter is not taken by the kernel; the step still equals the reference."
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(6, 4, generator=g).to(dev), torch.randn(9, generator=g).to(dev)]
    a = [torch.nn.Parameter(base[0].clone().t()), torch.nn.Parameter(base[1].clone())]
    b = [torch.nn.Parameter(base[0].clone().t()), torch.nn.Parameter(base[1].clone())]
    for ps in (a, b):
        for p in ps: p.grad = torch.ones_like(p)
    assert not a[0].is_contiguous()
    AdaXW(a, fused=True).step(); AdaXW(b).step()
    for x, y in zip(a, b): torch.testing.assert_close(x, y)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(K, "_INTERPRET", False)
    p = torch.randn(10)
    assert not K.fused_supported(p, p, p, p)
    a = torch.nn.Parameter(torch.randn(10)); b = torch.nn.Parameter(a.detach().clone())
    a.grad = torch.randn(10); b.grad = a.grad.clone()
    AdaXW([a], fused=True).step(); AdaXW([b]).step()
    assert torch.equal(a, b)


def test_fused_and_foreach_exclusive():
    with pytest.raises(ValueError, match="cannot both"): AdaX([torch.nn.Parameter(torch.zeros(1))], fused=True, foreach=True)
