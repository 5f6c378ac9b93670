"""GPU benchmark: the fused AdaX step (`xwlearn.kernels.adax`, `AdaXW(fused=True)`) vs torch's fused/foreach Adam.

`bench(roof_gbps) -> dict(shape, rows, target, ...)` (the interface of kernels/bench.py). Standalone:
`python kernels/bench_adax_step.py [--out DIR]` (= `python kernels/bench.py --only adax_step`). Every fused result is checked against the
reference update before anything is timed.
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the repo root: import xwlearn without installing
DEV = "cuda"                                                       # (a CPU dry run under TRITON_INTERPRET=1 sets "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))                # kernels/: the shared roof measurement
from bench import copy_roof_gbps
__all__ = ["bench", "copy_roof_gbps"]           # the notebooks' `#| cuda` cells take both from this script

N_PARAMS, N_TENSORS = 256 * 2**20, 64
CHECK_SHAPES = [(1,), (1000,), (3, 4097), (2**20 + 5,)]                # awkward sizes for the correctness check
BF16_MAX_EPS = 4                 # bf16 θ after 5 steps: at most this many eps·|θ| from the reference (a wrong kernel is off by far more)
CONFIGS = [dict(block=1024, chunk=1024, num_warps=4), dict(block=2048, chunk=2048, num_warps=8),
           dict(block=4096, chunk=4096, num_warps=8), dict(block=1024, chunk=8192, num_warps=4),
           dict(block=2048, chunk=16384, num_warps=8), dict(block=4096, chunk=32768, num_warps=16),
           dict(block=8192, chunk=8192, num_warps=16)]



def _round_like_device(x, dtype):
    "fp32 -> `dtype` as the kernel's device does: round to nearest even on GPUs; the Triton 3.8 interpreter truncates bf16."
    import torch
    if dtype != torch.bfloat16 or DEV != "cpu": return x.to(dtype)
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()


def _check(dtype):
    """Fused AdaX vs the reference update over 5 steps on awkward sizes. Returns the max |fused − ref| / max |ref| over
    all tensors of θ, m, v̂, and (bf16 θ) θ's largest difference in units of eps·|ref| (1–2 ulps): the
    reference keeps fp32 math and rounds θ once per step the way the device does, like the kernel; a rounding decided
    differently (FMA contraction) can still leave bf16 θ an ulp or two apart, which a relative error overstates."""
    import torch
    from xwlearn.kernels.adax import adax_fused_step, adax_step_ref
    from xwlearn.optim.adax import adax_beta2_hat, adax_eps_hat
    g = torch.Generator(device=DEV).manual_seed(0)
    shapes = CHECK_SHAPES
    ps = [torch.randn(s, device=DEV, generator=g).to(dtype) for s in shapes]
    ms = [torch.zeros(s, device=DEV) for s in shapes]; vs = [torch.zeros(s, device=DEV) for s in shapes]
    a = [[t.clone() for t in ts] for ts in (ps, ms, vs)]; b = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    for t in range(1, 6):
        gs = [torch.randn(s, device=DEV, generator=g).to(dtype) for s in shapes]
        for wd, dec in [(5e-2, True)] if t % 2 else [(5e-4, False)]:
            kw = dict(lr=5e-3, beta1=0.9, beta2_hat=adax_beta2_hat(t, 1e-4), eps_hat=adax_eps_hat(t, 1e-4, 1e-12),
                      weight_decay=wd, decoupled=dec)
            adax_fused_step(a[0], gs, a[1], a[2], **kw)
            p32 = [p.float() for p in b[0]]                  # the reference in fp32, θ rounded to its dtype as the device does
            adax_step_ref(p32, [x.float() for x in gs], b[1], b[2], **kw); b[0] = [_round_like_device(p, dtype) for p in p32]
    rel = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-30)).item()
              for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    fi = torch.finfo(dtype)
    spacings = max(((x.float() - y.float()).abs() / (fi.eps * y.float().abs().clamp(min=fi.tiny))).max().item()
                   for x, y in zip(a[0], b[0]))
    return dict(max_rel_err=rel, **({} if dtype == torch.float32 else dict(theta_max_err_in_eps=spacings)))


def bench(roof_gbps, n_params=N_PARAMS, n_tensors=N_TENSORS):
    "One optimiser step over `n_params` parameters in `n_tensors` tensors."
    import torch, triton, triton.testing as tt
    import xwlearn.kernels.adax as K
    from xwlearn.optim.adax import AdaXW
    t_start = time.time()
    errs = {str(dt): _check(dt) for dt in (torch.float32, torch.bfloat16)}
    assert errs["torch.float32"]["max_rel_err"] < 1e-5, f"fused AdaX fp32 differs from the reference: {errs}"
    assert errs["torch.bfloat16"]["theta_max_err_in_eps"] <= BF16_MAX_EPS, f"fused AdaX bf16 θ differs from the reference: {errs}"
    sizes = [n_params // n_tensors] * n_tensors

    def params(dtype=torch.float32):
        ps = [torch.nn.Parameter(torch.randn(s, device=DEV, dtype=dtype)) for s in sizes]
        for p in ps: p.grad = torch.randn_like(p)
        return ps

    def row(ms, bytes_per_param):
        gbps = bytes_per_param * n_params / (ms * 1e-3) / 1e9
        return dict(ms=ms, gbps=gbps, roof_frac=gbps / roof_gbps, bytes_per_param=bytes_per_param)

    rows, sweep = {}, []
    ps = params()
    # launch-configuration sweep on the functional step (fixed scalars), then the optimizer with the best one
    st = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    for cfg in CONFIGS:
        f = lambda: K.adax_fused_step(ps, [p.grad for p in ps], [m for m, _ in st], [v for _, v in st], lr=1e-3,
                                      beta1=0.9, beta2_hat=0.999, eps_hat=1e-8, weight_decay=5e-2, decoupled=True, **cfg)
        f(); sweep.append(dict(cfg, ms=tt.do_bench(f, return_mode="median")))
    st = None; torch.cuda.empty_cache()
    best = min(sweep, key=lambda r: r["ms"])
    K.ADAX_KERNEL_CONFIG.update({k: best[k] for k in ("block", "chunk", "num_warps")})
    peers = {"torch Adam(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
             "torch Adam(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
             "xwlearn AdaXW (reference, foreach)": lambda ps: AdaXW(ps, lr=1e-3, foreach=True),
             "xwlearn AdaXW(fused=True)": lambda ps: AdaXW(ps, lr=1e-3, fused=True)}
    for name, make in peers.items():
        opt = make(ps); opt.step()
        rows[name] = row(tt.do_bench(opt.step, return_mode="median"), 28)   # p, g, m, v read + p, m, v written
        del opt; torch.cuda.empty_cache()
    ps = None; torch.cuda.empty_cache()
    # the general (unaligned) launch: every θ a view starting 4 bytes past a 16-byte boundary of one flat buffer
    flat = torch.randn(n_params + 4 * n_tensors, device=DEV); ps, off = [], 1
    for s in sizes:
        ps.append(torch.nn.Parameter(flat[off:off + s])); ps[-1].grad = torch.randn_like(ps[-1])
        off += s; off += (1 - off) % 4                     # next start ≡ 1 (mod 4 elements)
    assert not any(K._aligned16(p) for p in ps)
    opt = AdaXW(ps, lr=1e-3, fused=True); opt.step()
    rows["xwlearn AdaXW(fused=True), unaligned θ"] = row(tt.do_bench(opt.step, return_mode="median"), 28)
    opt = ps = flat = None; torch.cuda.empty_cache()
    ps = params(torch.bfloat16)
    opt = AdaXW(ps, lr=1e-3, fused=True); opt.step()
    rows["xwlearn AdaXW(fused=True), bf16 params"] = row(tt.do_bench(opt.step, return_mode="median"), 22)   # 2+2+4+4 read, 2+4+4 written
    opt = ps = None; torch.cuda.empty_cache()
    base = rows["torch Adam(fused=True)"]["ms"]
    for r in rows.values(): r["vs_fused_adam"] = r["ms"] / base
    fused = rows["xwlearn AdaXW(fused=True)"]
    return dict(shape=f"{n_params} params in {n_tensors} tensors (fp32 unless noted), fp32 state",
                rows=rows, sweep=sweep, best_config=K.ADAX_KERNEL_CONFIG.copy(), check_max_rel_err=errs,
                target="AdaXW(fused=True) within 1.05x of torch Adam(fused=True) and >= 85% of the copy roof",
                met=bool(fused["vs_fused_adam"] <= 1.05 and fused["roof_frac"] >= 0.85),
                versions=dict(torch=torch.__version__, triton=triton.__version__), wall_s=time.time() - t_start)


if __name__ == "__main__":   # = `python kernels/bench.py --only adax_step [--out DIR]`
    sys.path.insert(0, str(Path(__file__).resolve().parent)); from bench import main
    sys.exit(main(["--only", "adax_step", *sys.argv[1:]]))
