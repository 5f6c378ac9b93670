"""Multi-scale deformable attention kernels (`xwlearn.kernels.ms_deform_attn`) against two oracles: the vision
substrate's `grid_sample` reference (`xwlearn.vision.detr.ms_deform_attn`) and an independent per-sample bilinear loop
in float64 written here (so the kernel stays checked if the substrate's reference changes).

CPU: the Triton interpreter, in this process (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported on
machines without a GPU), small awkward shapes; and a dry run of `kernels/bench_ms_deform_attn.py` at tiny sizes with
`triton.testing.do_bench` replaced by one timed call. CUDA (when available): the same cases compiled, float32 and bf16
at a mid-size shape, determinism of the two-pass backward, and the memory of one step against the reference.
"""
import itertools, math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# (B, Q, M, D, level shapes, K), options
CASES = [((2, 5, 2, 3, [(3, 5), (2, 2), (1, 1)], 2), dict(block_q=2)),            # partial query block, a 1x1 level
         ((1, 7, 1, 5, [(1, 1), (1, 1)], 1), {}),                                   # only 1x1 levels, K = 1
         ((1, 4, 3, 33, [(2, 7)], 3), dict(lo=-2.0, hi=3.0)),                       # one level, D = 33, far outside
         ((1, 6, 2, 4, [(5, 1), (1, 4)], 2), dict(block_s=2, block_e=2)),           # 1-wide maps, tiny reduce tiles
         ((2, 3, 2, 7, [(4, 3), (2, 2), (1, 2), (1, 1)], 3), dict(lo=-0.6, hi=1.6))] # 4 levels, L*K = 12 (padded to 16)
NAIVE_CASES = [0, 2]          # also against the per-sample loop (slow: a Python loop over samples and corners)
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # forward, vs float64 of the same inputs


def naive(value, shapes, loc, attn):
    "Independent oracle: for every sample, the 4 pixels around (u W - 1/2, v H - 1/2), zero outside; differentiable."
    B, S, M, D = value.shape
    _, Q, _, L, K, _ = loc.shape
    starts = [0] + list(itertools.accumulate(h * w for h, w in shapes))
    rows = []
    for b, q, m in itertools.product(range(B), range(Q), range(M)):
        acc = value.new_zeros(D)
        for l, k in itertools.product(range(L), range(K)):
            h, w = shapes[l]
            x, y = loc[b, q, m, l, k, 0] * w - 0.5, loc[b, q, m, l, k, 1] * h - 0.5
            x0, y0 = math.floor(x.item()), math.floor(y.item())
            for xi, yi in [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]:
                if 0 <= xi < w and 0 <= yi < h:
                    wt = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                    acc = acc + attn[b, q, m, l, k] * wt * value[b, starts[l] + yi * w + xi, m]
        rows.append(acc)
    return torch.stack(rows).view(B, Q, M * D)


def make(B, Q, M, D, shapes, K, dtype=torch.float64, lo=-0.3, hi=1.3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Q, M, L, K, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(B, Q, M, L, K, generator=g, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (value, loc, attn))


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def check_case(case, kw, bwd, dtype=torch.float64, device="cpu", tol=None, with_naive=False):
    "Output and the three gradients of the kernel vs the substrate's reference (and the naive loop) in float64."
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn, use_kernel
    from xwlearn.vision.detr import ms_deform_attn as reference
    B, Q, M, D, shapes, K = case
    kw = dict(kw)
    lo, hi = kw.pop("lo", -0.3), kw.pop("hi", 1.3)
    value, loc, attn = make(B, Q, M, D, shapes, K, dtype, lo, hi, device=device)
    assert use_kernel(value), "the kernel path is not active"
    ins = [t.requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(value, shapes, loc, attn, bwd=bwd, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, dout)
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    oracles = [reference] + ([naive] if with_naive else [])
    tol = tol or (1e-11 if dtype == torch.float64 else 1e-4)
    for fn in oracles:
        o_ref = fn(ref_in[0], shapes, ref_in[1], ref_in[2])
        g_ref = torch.autograd.grad(o_ref, ref_in, dout.double())
        errs = [rel_err(a, b) for a, b in zip((out, *grads), (o_ref, *g_ref))]
        assert max(errs) < tol, (fn.__name__, case, bwd, dtype, errs)


def _kernel_device():
    "Where the kernels run in this process: the GPU, or the CPU under the interpreter (tests/conftest.py switches it on)."
    from xwlearn.kernels.ms_deform_attn import use_kernel
    if CUDA: return "cuda"
    if _old_interpreter_new_numpy():
        pytest.skip("Triton < 3.7's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 rejects")
    if not use_kernel(torch.empty(0)):
        pytest.skip("no GPU and the Triton interpreter is off: TRITON_INTERPRET=1 must be set before triton is imported "
                    "(tests/conftest.py does so on CPU-only machines)")
    return "cpu"


def _old_interpreter_new_numpy():
    from importlib.metadata import version
    import numpy as np
    ver = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])
    return ver(version("triton")) < (3, 7) and ver(np.__version__) >= (2, 4)


@pytest.mark.parametrize("bwd", ["atomic", "two_pass"])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_oracles(i, bwd):
    "Output and the gradients of value, locations and weights vs the reference (float64); two cases also vs the naive loop."
    case, kw = CASES[i]
    check_case(case, kw, bwd, device=_kernel_device(), with_naive=i in NAIVE_CASES and bwd == "atomic")


@pytest.mark.parametrize("bwd", ["atomic", "two_pass"])
def test_gradcheck(bwd):
    "float64 gradcheck (fast mode) with points outside the map and a 1x1 level."
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn
    shapes = [(3, 4), (1, 1)]
    ins = tuple(t.requires_grad_() for t in make(1, 4, 2, 3, shapes, 2, device=_kernel_device()))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, l, a, bwd=bwd), ins, fast_mode=True)


def test_lower_precision_forward():
    "fp32 / fp16 / bf16 inputs: the output (in the input's dtype) within a few ulps of the float64 reference of the same inputs."
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn
    from xwlearn.vision.detr import ms_deform_attn as reference
    shapes = [(4, 6), (2, 3), (1, 1)]
    ref_in = make(2, 9, 2, 8, shapes, 2, device=_kernel_device())
    for dtype, tol in DTYPE_TOL.items():
        value, loc, attn = (t.to(dtype) for t in ref_in)
        o = ms_deform_attn(value, shapes, loc, attn)
        o_ref = reference(value.double(), shapes, loc.double(), attn.double())
        assert o.dtype == dtype and rel_err(o, o_ref) < tol, (dtype, rel_err(o, o_ref))


def test_two_pass_is_bit_reproducible_and_empty_queries():
    "two_pass gives the same value gradient bit for bit; zero queries give an empty output and zero gradients."
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn, MSDA_BWD
    device = _kernel_device()
    shapes = [(4, 6), (2, 3), (1, 1)]
    value, loc, attn = (t.float().requires_grad_() for t in make(2, 9, 2, 8, shapes, 2, device=device))
    runs = [torch.autograd.grad(ms_deform_attn(value, shapes, loc, attn, bwd="two_pass").square().sum(), value)[0]
            for _ in range(2)]
    assert torch.equal(*runs)
    value, loc, attn = (t.float().requires_grad_() for t in make(1, 0, 2, 4, shapes, 2, device=device))
    assert ms_deform_attn(value, shapes, loc, attn).shape == (1, 0, 8)
    for bwd in MSDA_BWD:
        gv, = torch.autograd.grad(ms_deform_attn(value, shapes, loc, attn, bwd=bwd).sum(), value)
        assert gv.shape == value.shape and gv.abs().max() == 0


@pytest.mark.skipif(CUDA, reason="the real benchmark runs on the GPU (kernels/bench.py)")
def test_benchmark_script_dry_run_on_cpu(monkeypatch):
    "kernels/bench_ms_deform_attn.py end to end at tiny sizes (kernel rows under the interpreter, do_bench replaced by"
    " one timed call): every row — reference, torch.compile, both backwards — runs and passes its check."
    import importlib.util, time
    import triton.testing as tt
    _kernel_device()
    monkeypatch.setattr(tt, "do_bench", lambda fn, **kw: (lambda t: (fn(), 1e3 * (time.perf_counter() - t))[1])(time.perf_counter()))
    spec = importlib.util.spec_from_file_location("xw_bench_msda_dry", ROOT / "kernels/bench_ms_deform_attn.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    res = mod.bench(1.0, cases=[("tiny", 4)], B=1, H=2, D=5, P=2, levels=[(3, 4), (2, 2), (1, 1)], device="cpu",
                    compile_backend="eager", configs=({}, dict(block_q=2)))
    rows = res["rows"]
    want = {f"tiny | {p}" for p in (mod.REF, mod.COMPILED, "xwlearn kernel (atomic)", "xwlearn kernel (two_pass)")}
    assert set(rows) == want, rows.keys()
    for name, row in rows.items():
        assert "error" not in row and row.get("ok") and row["ms"] > 0 and row["err"] < 1e-5, (name, row)
    for var in ("atomic", "two_pass"):
        assert set(rows[f"tiny | xwlearn kernel ({var})"]["configs"]) == {"default", "block_q=2"}
    assert res["met"] is None                                        # no encoder case in the dry run: no verdict
    assert mod.LEVELS == [(-(-800 // s), -(-1333 // s)) for s in (8, 16, 32, 64)]
    assert sum(h * w for h, w in mod.LEVELS) == dict(mod.CASES)["encoder"] == 22223


def test_naive_oracle_equals_substrate_reference():
    "The two oracles agree (float64, points outside, a 1x1 level), forward and gradients."
    from xwlearn.vision.detr import ms_deform_attn as reference
    shapes = [(3, 5), (2, 2), (1, 1)]
    ins = [t.requires_grad_() for t in make(2, 3, 2, 3, shapes, 2)]
    o1, o2 = naive(ins[0], shapes, ins[1], ins[2]), reference(ins[0], shapes, ins[1], ins[2])
    assert rel_err(o1, o2) < 1e-12
    do = torch.randn_like(o1)
    for a, b in zip(torch.autograd.grad(o1, ins, do), torch.autograd.grad(o2, ins, do)):
        assert rel_err(a, b) < 1e-12


def test_argument_errors_name_the_argument():
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn
    shapes = [(3, 5), (2, 2)]
    value, loc, attn = make(1, 4, 2, 3, shapes, 2)
    for call, exc, msg in [(lambda: ms_deform_attn(value[:, :-1], shapes, loc, attn), ValueError, "value: expected S"),
                           (lambda: ms_deform_attn(value, shapes[:1], loc, attn), ValueError, "spatial_shapes"),
                           (lambda: ms_deform_attn(value, [(3, 5), (0, 2)], loc, attn), ValueError, "spatial_shapes"),
                           (lambda: ms_deform_attn(value, shapes, loc[..., 0], attn), ValueError, "sampling_locations"),
                           (lambda: ms_deform_attn(value, shapes, loc[:, :, :1], attn), ValueError, "sampling_locations"),
                           (lambda: ms_deform_attn(value, shapes, loc, attn[..., :1]), ValueError, "attention_weights"),
                           (lambda: ms_deform_attn(value, shapes, loc, attn, level_start_index=[0, 3]), ValueError,
                            "level_start_index"),
                           (lambda: ms_deform_attn(value, shapes, loc, attn, bwd="sorted"), ValueError, "bwd"),
                           (lambda: ms_deform_attn(value.long(), shapes, loc, attn), TypeError, "value"),
                           (lambda: ms_deform_attn(value, torch.tensor(shapes).float(), loc, attn), TypeError,
                            "spatial_shapes")]:
        with pytest.raises(exc, match=msg): call()


def test_fallback_is_the_reference(monkeypatch):
    "Where the kernels do not run (a CPU tensor, interpreter off), the result is the reference's, gradients too."
    from xwlearn.kernels import ms_deform_attn as K
    from xwlearn.vision.detr import ms_deform_attn as reference
    monkeypatch.setattr(K, "_INTERPRET", False)
    shapes = [(2, 3), (1, 1)]
    ins = [t.requires_grad_() for t in make(1, 3, 2, 4, shapes, 2)]
    assert not K.use_kernel(ins[0])
    o = K.ms_deform_attn(ins[0], shapes, ins[1], ins[2], level_start_index=[0, 6])
    assert torch.equal(o, reference(ins[0], shapes, ins[1], ins[2]))
    assert all(g is not None for g in torch.autograd.grad(o.sum(), ins))


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("bwd", ["atomic", "two_pass"])
def test_cuda_matches_reference(bwd):
    "Compiled kernels: the small cases in float32, and a mid-size 4-level problem (900 queries) in float32 and bf16."
    for case, kw in CASES:
        check_case(case, kw, bwd, dtype=torch.float32, device="cuda", tol=1e-4)
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn
    from xwlearn.vision.detr import ms_deform_attn as reference
    shapes = [(50, 84), (25, 42), (13, 21), (7, 11)]
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]:
        value, loc, attn = make(2, 900, 8, 32, shapes, 4, dtype=dtype, lo=-0.05, hi=1.05, device="cuda")
        ins = [t.requires_grad_() for t in (value, loc, attn)]
        o = ms_deform_attn(value, torch.tensor(shapes, device="cuda"), loc, attn, bwd=bwd)
        ref_in = [t.detach().float().requires_grad_() for t in ins]
        o_ref = reference(ref_in[0], shapes, ref_in[1], ref_in[2])
        do = torch.randn_like(o_ref)
        rel2 = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
        assert rel2(o, o_ref) < tol
        for a, b in zip(torch.autograd.grad(o, ins, do.to(dtype)), torch.autograd.grad(o_ref, ref_in, do)):
            assert rel2(a, b) < tol, (dtype, bwd)


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_two_pass_is_deterministic_and_lean():
    "two_pass gives the same bits twice; one fwd+bwd allocates < 1/3 of the reference's step (atomic: no entries) and"
    " less than the reference (two_pass: 4 entries per sample plus the sort's scratch; the benchmark measures the ratio)."
    from xwlearn.kernels.ms_deform_attn import ms_deform_attn
    from xwlearn.vision.detr import ms_deform_attn as reference
    shapes = [(100, 167), (50, 84), (25, 42), (13, 21)]
    ins = [t.requires_grad_() for t in make(2, 4000, 8, 32, shapes, 4, dtype=torch.float32, lo=-0.05, hi=1.05,
                                            device="cuda")]
    st = torch.tensor(shapes, device="cuda")
    g = [torch.autograd.grad(ms_deform_attn(ins[0], st, ins[1], ins[2], bwd="two_pass").square().sum(), ins[0])[0]
         for _ in range(2)]
    assert torch.equal(*g)
    peaks = {}
    for name, f in [("reference", lambda: reference(ins[0], shapes, ins[1], ins[2])),
                    ("atomic", lambda: ms_deform_attn(ins[0], st, ins[1], ins[2], bwd="atomic")),
                    ("two_pass", lambda: ms_deform_attn(ins[0], st, ins[1], ins[2], bwd="two_pass"))]:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        f().sum().backward(); torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        for t in ins: t.grad = None
    assert peaks["atomic"] < peaks["reference"] / 3 and peaks["two_pass"] < peaks["reference"], peaks
