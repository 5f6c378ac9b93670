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


# The interpreter runs small blocks: the 1500-element tensor then has 5 full blocks (the kernel's unmasked fast path)
# and one masked partial block, and spans two chunks. (A block larger than every tensor would test the masked path only.)
INTERP_CFG = dict(block=256, chunk=1024)


@pytest.fixture(autouse=True)
def _cfg():
    saved = dict(K.ADAX_KERNEL_CONFIG)
    if K._INTERPRET and not CUDA: K.ADAX_KERNEL_CONFIG.update(INTERP_CFG)  # the MODULE's config: the optimizer launches with it
    yield
    K.ADAX_KERNEL_CONFIG.clear(); K.ADAX_KERNEL_CONFIG.update(saved)


@pytest.mark.parametrize("dev", DEVS)
def test_both_kernel_paths_are_exercised(dev):
    "The shapes the 60-step tests use have full blocks (unmasked path) and partial blocks (masked path) under the config in force."
    blk = K.ADAX_KERNEL_CONFIG["block"]; ns = [torch.Size(s).numel() for s in shapes_for(dev)]
    assert sum(n // blk for n in ns) >= 2, (blk, ns)           # full blocks: `_adax_block(..., MASKED=False)`
    assert sum(n % blk > 0 for n in ns) >= 2, (blk, ns)        # partial blocks: the masked path
    assert any(n > K.ADAX_KERNEL_CONFIG["chunk"] for n in ns)  # a tensor spread over several programs


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
    "Several chunks per tensor (small chunk), every weight-decay variant, fp32, bf16 and fp16, vs `adax_step_ref`."
    shapes = shapes_for(dev); g = torch.Generator().manual_seed(1)
    kw = dict(lr=1e-2, beta1=0.9, beta2_hat=adax_beta2_hat(7, 1e-4), eps_hat=adax_eps_hat(7, 1e-4, 1e-12))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for wd, dec in [(0.0, False), (5e-2, True), (5e-4, False)]:
            a = [[torch.randn(s, generator=g).to(dev, dtype) for s in shapes] for _ in range(2)] + \
                [[torch.rand(s, generator=g).to(dev) for s in shapes] for _ in range(2)]
            b = [[t.clone() for t in ts] for ts in a]
            K.adax_fused_step(*a, **kw, weight_decay=wd, decoupled=dec, block=256, chunk=1024)
            K.adax_step_ref(*b, **kw, weight_decay=wd, decoupled=dec)
            for xs, ys in zip(a, b):
                for x, y in zip(xs, ys):
                    torch.testing.assert_close(x.float(), y.float(), rtol={torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype], atol=1e-6)


def _round_bf16(x):
    "fp32 -> bf16 as the executing device does: the Triton interpreter truncates (triton 3.8), GPUs round to nearest even."
    if x.is_cuda: return x.bfloat16()
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()


def _round_to(x, dtype):
    "fp32 -> the parameter dtype as the executing device rounds (fp16: nearest-even everywhere, the interpreter included)."
    return _round_bf16(x) if dtype == torch.bfloat16 else x.to(dtype)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_fp32_state(dev, dtype):
    "bf16/fp16 θ, fp32 m and v̂: equals the reference update on an fp32 copy of θ rounded to θ's dtype after every step."
    shapes = shapes_for(dev)[:3] + shapes_for(dev)[-1:]; steps = 30     # the last shape has full (unmasked) blocks
    g = torch.Generator().manual_seed(3)
    p0 = [torch.randn(s, generator=g).to(dev, dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * (20 if k % 9 == 0 else 1)).to(dev, dtype) for s in shapes] for k in range(steps)]
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
        ref = [_round_to(p, dtype) for p in p32]
    tol = 2**-6 if dtype == torch.bfloat16 else 2**-9                  # ≤ ~2 ulps of θ's dtype (FMA contraction may differ)
    for a, b in zip(ps, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach().float(), b.float(), rtol=tol, atol=1e-6)
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


@pytest.mark.parametrize("dtype, loads, stores", [(torch.float32, 8, 6), (torch.bfloat16, 6, 5)])
def test_aligned_kernel_uses_128_bit_accesses(dtype, loads, stores):
    "sm_90 PTX compiled ahead of time (no GPU needed): full blocks of the aligned variant use ld/st.global.v4 only."
    ptx = K.adax_kernel_ptx(dtype, aligned=True, block=2048, chunk=16384, num_warps=8)
    ops = K.ptx_global_ops(ptx)
    # 8 elements per thread and tensor: fp32 2 × 16 B each for θ, g, m, v̂ (stores θ, m, v̂); bf16 θ and g 1 × 16 B
    assert (ops["ld.v4"], ops["st.v4"]) == (loads, stores), ops
    un = K.ptx_global_ops(K.adax_kernel_ptx(dtype, aligned=False, block=2048, chunk=16384, num_warps=8))
    assert un["ld.v4"] == un["ld.v2"] == 0 and un["ld"] > ops["ld"], un


def test_ptx_rejects_bad_dtype():
    with pytest.raises(ValueError, match="`p_dtype` must be one of"): K.adax_kernel_ptx(torch.int32)


@pytest.mark.parametrize("dev", DEVS)
def test_unaligned_views_take_the_general_launch(dev, monkeypatch):
    "θ views at +4 bytes (unaligned) and aligned tensors in one step: two launches, both equal to the reference."
    launches = []
    real = K._adax_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["ALIGNED"]); return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(K, "_adax_kernel", Spy())
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(1 + 700 + 1 + 333, generator=g).to(dev)
    ps = [flat[1:701].view(7, 100), flat[702:], torch.randn(257, generator=g).to(dev)]
    assert [K._aligned16(p) for p in ps] == [False, False, True]
    a = [ps] + [[torch.randn(p.shape, generator=g).to(dev) for p in ps] for _ in range(3)]
    a[3] = [v.abs() for v in a[3]]
    b = [[t.clone() for t in ts] for ts in a]
    kw = dict(lr=1e-2, beta1=0.9, beta2_hat=adax_beta2_hat(3, 1e-4), eps_hat=adax_eps_hat(3, 1e-4, 1e-12),
              weight_decay=5e-4, decoupled=False)
    K.adax_fused_step(*a, **kw, block=128, chunk=256); K.adax_step_ref(*b, **kw)
    assert sorted(launches) == [False, True]
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys): torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(CUDA, reason="the real benchmark runs on the GPU (kernels/gpu_check.sh)")
def test_benchmark_script_dry_run_on_cpu(monkeypatch):
    "kernels/bench_adax_step.py end to end on CPU tensors (interpreter, tiny sizes, a wall-clock timer): no GPU minutes lost to a script bug."
    import importlib.util, time, triton.testing as tt
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("xw_bench_adax_dry", Path(__file__).parents[1] / "kernels/bench_adax_step.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DEV", "cpu")
    monkeypatch.setattr(mod, "CHECK_SHAPES", [(1,), (37,), (3, 301)])
    monkeypatch.setattr(mod, "CONFIGS", [dict(block=1024, chunk=1024, num_warps=4), dict(block=512, chunk=2048, num_warps=4)])

    def do_bench(fn, return_mode="median"):
        fn(); t = time.perf_counter(); fn(); return 1e3 * (time.perf_counter() - t)
    monkeypatch.setattr(tt, "do_bench", do_bench)
    r = mod.bench(roof_gbps=1.0, n_params=4 * 1500, n_tensors=4)
    assert set(r["rows"]) == {"torch Adam(fused=True)", "torch Adam(foreach=True)", "xwlearn AdaXW (reference, foreach)",
                              "xwlearn AdaXW(fused=True)", "xwlearn AdaXW(fused=True), unaligned θ",
                              "xwlearn AdaXW(fused=True), bf16 params"}
    assert r["check_max_rel_err"]["torch.float32"]["max_rel_err"] < 1e-5 and len(r["sweep"]) == 2
    assert all(v["ms"] > 0 and v["vs_fused_adam"] > 0 for v in r["rows"].values())
    assert isinstance(r["met"], bool)
