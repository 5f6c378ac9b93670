"""Temporal RoI Align's streaming top-k kernel (`xwlearn.kernels.temporal_roi_align`) against the paper module's oracle
(`xwlearn.detection.temporal_roi_align.most_similar_roi_align`) and against a per-pixel loop written here.

CPU: the Triton interpreter, in this process (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported on
machines without a GPU), small awkward shapes in float64: positions equal, features and gradients within 1e-12; and a
dry run of `kernels/bench_temporal_roi_align.py` at tiny sizes with `triton.testing.do_bench` replaced by one timed
call. CUDA (when available): float32 at a mid-size shape, and the forward's memory against the oracle's.
"""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
torch.set_num_threads(1)

# (n RoIs, C, T, H, W, k), tiles
CASES = [((2, 5, 3, 4, 5, 2), {}),                                   # 98 RoI pixels: 7 blocks of 16, the last partial
         ((1, 20, 2, 3, 3, 9), {}),                                  # k = HW = 9 (padded to 16 slots)
         ((3, 17, 1, 7, 6, 1), dict(block_s=16, block_c=16)),        # k = 1, partial pixel and channel tiles
         ((1, 70, 2, 9, 8, 3), dict(block_s=16, block_c=32)),        # C = 70: three channel chunks, odd k
         ((1, 3, 2, 1, 1, 1), {})]                                   # a 1x1 reference map (k = HW = 1), C = 3


def _kernel_device():
    from xwlearn.kernels.temporal_roi_align import use_kernel
    if CUDA: return "cuda"
    if not use_kernel(torch.empty(0)):
        pytest.skip("no GPU and the Triton interpreter is off: TRITON_INTERPRET=1 must be set before triton is imported "
                    "(tests/conftest.py does so on CPU-only machines)")
    return "cpu"


def loop_positions(x, f, k):
    "Independent selection: per RoI pixel and frame, positions sorted by (-cosine, position), first k; (P, T, k)."
    n, c, h, w = x.shape; T = f.shape[0]
    q = torch.nn.functional.normalize(x, dim=1, eps=1e-12).permute(0, 2, 3, 1).reshape(-1, c)
    r = torch.nn.functional.normalize(f.flatten(2), dim=1, eps=1e-12)
    out = torch.empty(q.shape[0], T, k, dtype=torch.long)
    for p in range(q.shape[0]):
        for t in range(T):
            sims = (q[p] @ r[t]).tolist()
            out[p, t] = torch.tensor(sorted(range(len(sims)), key=lambda s: (-sims[s], s))[:k])
    return out


def check(x, f, k, device, tol=1e-12, **kw):
    "Kernel vs oracle: positions equal, output and both gradients within tol."
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    from xwlearn.detection.temporal_roi_align import most_similar_roi_align as oracle
    xa, fa = x.to(device).requires_grad_(), f.to(device).requires_grad_()
    xb, fb = x.detach().double().requires_grad_(), f.detach().double().requires_grad_()
    y, idx = most_similar_roi_align(xa, fa, k, return_index=True, **kw)
    y0, idx0 = oracle(xb, fb, k, return_index=True)
    assert torch.equal(idx.cpu(), idx0)
    assert (y.cpu().double() - y0).abs().max() < tol
    dy = torch.randn_like(y0)
    for a, b in zip(torch.autograd.grad(y, (xa, fa), dy.to(device, y.dtype)), torch.autograd.grad(y0, (xb, fb), dy)):
        assert (a.cpu().double() - b).abs().max() < tol * max(1.0, b.abs().max().item())
    return idx0


@pytest.mark.parametrize("i", range(len(CASES)))
def test_kernel_matches_oracle(i):
    "Positions, features and gradients vs the oracle in float64 on awkward shapes; positions also vs the loop."
    (n, C, T, H, W, k), kw = CASES[i]
    g = torch.Generator().manual_seed(i)
    x, f = torch.randn(n, C, 7, 7, generator=g, dtype=torch.float64), torch.randn(T, C, H, W, generator=g, dtype=torch.float64)
    idx0 = check(x, f, k, _kernel_device(), **kw)
    if i in (0, 2): assert torch.equal(idx0, loop_positions(x, f, k))


@pytest.mark.parametrize("C,k", [(4, 3), (16, 4), (4, 5)])
def test_ties_follow_the_oracle(C, k):
    "±1 features (norm 2 or 4): every similarity is an exact binary fraction, so ties are bit-exact and plentiful; with"
    " zero pixels (similarity 0) too, the kernel picks the oracle's positions — the lowest position among equals."
    g = torch.Generator().manual_seed(C + k)
    pm1 = lambda *s: (torch.randint(0, 2, s, generator=g) * 2 - 1).double()
    x, f = pm1(2, C, 7, 7), pm1(2, C, 6, 7)
    f[0, :, 1] = 0
    idx0 = check(x, f, k, _kernel_device(), block_s=16, block_c=16)
    assert torch.equal(idx0, loop_positions(x, f, k))
    # a constant frame: every position ties, the first k win, in order
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    _, idx = most_similar_roi_align(x.to(_kernel_device()), torch.ones(1, C, 5, 5, dtype=torch.float64, device=_kernel_device()),
                                    k=min(k, 25), return_index=True)
    assert (idx.cpu() == torch.arange(min(k, 25))).all()


def test_gradcheck_through_the_recomposition():
    "float64 gradcheck of the wrapper (the backward is the oracle's recomposition, in slices of 4 RoI pixels)."
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    dev = _kernel_device()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    f = torch.randn(2, 4, 4, 5, dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: most_similar_roi_align(a, b, 2, bwd_chunk=4), (x, f), fast_mode=True)


def test_zero_rois_and_zero_frames():
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    dev = _kernel_device()
    x = torch.randn(0, 6, 7, 7, dtype=torch.float64, device=dev, requires_grad=True)
    f = torch.randn(3, 6, 4, 5, dtype=torch.float64, device=dev, requires_grad=True)
    y, idx = most_similar_roi_align(x, f, 2, return_index=True)
    assert y.shape == (3, 0, 6, 7, 7) and idx.shape == (0, 3, 2)
    assert torch.autograd.grad(y.sum(), f)[0].abs().max() == 0
    assert most_similar_roi_align(torch.randn(2, 6, 7, 7, device=dev), f[:0].float(), 2).shape == (0, 2, 6, 7, 7)


def test_float32_and_the_extractor():
    "float32 inputs: the oracle's positions and ~1e-6 features; as TemporalRoIAlign's align_fn, the same extractor output."
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    from xwlearn.detection.temporal_roi_align import TemporalRoIAlign
    dev = _kernel_device()
    g = torch.Generator().manual_seed(3)
    x, f = torch.randn(2, 24, 7, 7, generator=g), torch.randn(2, 24, 6, 9, generator=g)
    check(x, f, 2, dev, tol=1e-5)
    torch.manual_seed(0)
    feat, boxes = torch.randn(1, 16, 12, 14, device=dev), [torch.tensor([[2., 3., 9., 10.]], device=dev)]
    refs = [torch.randn(2, 16, 12, 14, device=dev)]
    ex = TemporalRoIAlign(16).to(dev)
    out0 = ex({"0": feat}, boxes, [(12, 14)], ref_feats=refs)
    ex.align_fn = most_similar_roi_align
    assert (ex({"0": feat}, boxes, [(12, 14)], ref_feats=refs) - out0).abs().max() < 1e-5


def test_argument_errors_name_the_argument():
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    dev = _kernel_device()
    x, f = torch.randn(2, 6, 7, 7, device=dev), torch.randn(3, 6, 4, 5, device=dev)
    for call, exc, msg in [(lambda: most_similar_roi_align(x, f, k=21), ValueError, r"k: expected an int in \[1, H\*W=20\]"),
                           (lambda: most_similar_roi_align(x, f[:, :4]), ValueError, "ref_feats: expected 6 channels"),
                           (lambda: most_similar_roi_align(x[0], f), ValueError, "roi_feats: expected a 4-d"),
                           (lambda: most_similar_roi_align(x, f, block_p=24), ValueError, "block_p: expected a power of two"),
                           (lambda: most_similar_roi_align(x, f, bwd_chunk=0), ValueError, "bwd_chunk"),
                           (lambda: most_similar_roi_align(x, f, precision="bf16"), ValueError, "precision: expected one of"),
                           (lambda: most_similar_roi_align(x, f.tolist()), TypeError, "ref_feats: expected a Tensor")]:
        with pytest.raises(exc, match=msg): call()


def test_fallback_is_the_oracle(monkeypatch):
    from xwlearn.kernels import temporal_roi_align as K
    from xwlearn.detection.temporal_roi_align import most_similar_roi_align as oracle
    monkeypatch.setattr(K, "_INTERPRET", False)
    x, f = torch.randn(2, 6, 7, 7), torch.randn(3, 6, 4, 5)
    assert not K.use_kernel(x)
    assert torch.equal(K.most_similar_roi_align(x, f, 2), oracle(x, f, 2))


def test_memory_formula():
    "The formulas at the anchor shape: S = P*T*HW floats; the kernel keeps the output, positions and similarities."
    from xwlearn.kernels.temporal_roi_align import troi_memory
    m = troi_memory(300, 14, 38, 63, 512, 2)
    P = 300 * 49
    assert m["similarity"] == P * 14 * 38 * 63 * 4 and m["gathers"] == 2 * P * 14 * 2 * 512 * 4
    assert m["kernel"] == P * 14 * (512 * 4 + 2 * 8 + 2 * 4)
    assert m["oracle_grad"] - m["kernel"] == m["similarity"] + m["gathers"] - P * 14 * 2 * 4


@pytest.mark.skipif(CUDA, reason="the real benchmark runs on the GPU (kernels/bench.py)")
def test_benchmark_script_dry_run_on_cpu(monkeypatch):
    "kernels/bench_temporal_roi_align.py end to end at tiny sizes (kernel rows under the interpreter, do_bench replaced"
    " by one timed call): every row — reference, torch.compile (eager), the kernel's tiles — runs and passes its check."
    import importlib.util, time
    import triton.testing as tt
    _kernel_device()
    monkeypatch.setattr(tt, "do_bench", lambda fn, **kw: (lambda t: (fn(), 1e3 * (time.perf_counter() - t))[1])(time.perf_counter()))
    spec = importlib.util.spec_from_file_location("xw_bench_troi_dry", ROOT / "kernels/bench_temporal_roi_align.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    res = mod.bench(1.0, cases=[("tiny", 2)], n_rois=1, C=20, H=5, W=6, k=2, device="cpu", compile_backend="eager",
                    configs=({}, dict(block_p=32, block_s=16)))
    rows = res["rows"]
    mine = [f"{mod.MINE} ({v})" for v in mod.VARIANTS]
    assert set(rows) == {f"tiny | {p}" for p in (mod.REF, mod.COMPILED, *mine)}, rows.keys()
    for name, row in rows.items():
        assert "error" not in row and row.get("ok") and row["ms"] > 0 and row["fwd_ms"] > 0 and row["err"] < 1e-5, (name, row)
        assert row["index_agree"] == 1.0
    for m in mine: assert set(rows["tiny | " + m]["configs"]) == {"default", "block_p=32,block_s=16"}
    assert mod.VARIANTS == ("ieee", "tf32")
    assert res["met"] is None                                        # no 14-refs case in the dry run: no verdict
    assert dict(mod.CASES) == {"2 refs": 2, "14 refs": 14} and mod.SHAPE == dict(n_rois=300, C=512, H=38, W=63, k=2)


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_matches_oracle_and_is_lean():
    "Compiled kernel: float32 at 100 RoIs x 14 refs of 38x63 (C = 256) vs the oracle; the forward allocates < 1/3."
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    from xwlearn.detection.temporal_roi_align import most_similar_roi_align as oracle
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(100, 256, 7, 7, device="cuda", generator=g).relu()
    f = torch.randn(14, 256, 38, 63, device="cuda", generator=g).relu()
    peaks, outs = {}, {}
    for name, fn in [("oracle", oracle), ("kernel", most_similar_roi_align)]:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        with torch.no_grad(): outs[name] = fn(x, f, 2, return_index=True)
        torch.cuda.synchronize(); peaks[name] = torch.cuda.max_memory_allocated() - before
    (y, idx), (y0, idx0) = outs["kernel"], outs["oracle"]
    assert (idx == idx0).float().mean() > 0.999
    assert ((y - y0).norm() / y0.norm()).item() < 1e-3
    assert peaks["kernel"] < peaks["oracle"] / 3, peaks
