"""Fused bi-level routing attention (`xwlearn.kernels.bra`) against independent references, forward and backward.

Two devices: "cpu-interpreter" runs the Triton kernels through Triton's CPU interpreter in a subprocess (the
interpreter must be switched on before `triton` is first imported, which another test module may already have done
in this process); "cuda" runs them on a GPU (skipped without one). The oracle is dense attention with an additive
log(multiplicity) routing mask, written here without sharing code with the module; the CUDA case also compares with
the module's gather reference at BiFormer's stage shapes, with the BiFormer module's `routed_attention` when it is
importable, and checks that the kernel's extra memory stays below the gather design's. On the GPU the small cases run
in float32 (not float64) and without gradcheck.
"""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# (B, heads, regions, tokens per region, head dim, topk), options — small enough for the interpreter
CASES = [((1, 1, 4, 1, 3, 1), {}),                        # 1-token regions, top-1
         ((2, 2, 9, 4, 8, 2), {}),                        # 4-token regions packed 16 per 64-row program
         ((1, 2, 5, 7, 5, 5), dict(block=16)),            # odd region and head dim, top-k = all regions
         ((2, 1, 4, 16, 32, 1), dict(scale=0.3)),         # 16-token regions, top-1, custom scale
         ((1, 1, 4, 49, 16, 2), dict(block=32)),          # 7x7 regions, padded, 2 chunks per region
         ((2, 2, 6, 4, 4, 3), dict(repeat=True)),         # repeated regions: counted twice, as torch.gather does
         ((1, 2, 4, 16, 16, 2), dict(dtype=torch.float32)),
         ((1, 2, 4, 16, 16, 2), dict(dtype=torch.bfloat16)),
         ((1, 2, 4, 16, 16, 2), dict(dtype=torch.float16))]
TOL = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def oracle(q, k, v, idx, scale=None):
    "Dense attention over all tokens; region j is visible from region i with multiplicity count(j in idx[b, i])."
    B, h, n, T, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    cnt = torch.zeros(B, n, n, dtype=q.dtype, device=q.device).scatter_add_(
        2, idx.long(), torch.ones(idx.shape, dtype=q.dtype, device=q.device))
    bias = cnt.log().repeat_interleave(T, 1).repeat_interleave(T, 2)
    s = q.reshape(B, h, n * T, d) @ k.reshape(B, h, n * T, d).transpose(-1, -2) * scale + bias[:, None]
    return (s.softmax(-1) @ v.reshape(B, h, n * T, d)).reshape(B, h, n, T, d)


def make(B, h, n, T, d, topk, dtype=torch.float64, repeat=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, T, d, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(3))
    idx = (torch.randint(0, n, (B, n, topk), generator=g) if repeat
           else torch.rand(B, n, n, generator=g).topk(topk, -1).indices).to(device)
    return q, k, v, idx


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


BWDS = ("v1", "v2", "atomic")   # every backward implementation of the module


def check_case(shape, dtype=torch.float64, repeat=False, block=None, scale=None, device="cpu", bwd=None):
    from xwlearn.kernels.bra import bra_attention, use_kernel
    q, k, v, idx = make(*shape, dtype=dtype, repeat=repeat, device=device)
    assert use_kernel(q), "the kernel path is not active"
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = bra_attention(q, k, v, idx, scale=scale, block=block, bwd=bwd)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref = oracle(qr, kr, vr, idx, scale)
    g_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.double())
    errs = [rel_err(a, b) for a, b in zip((o, *grads), (o_ref, *g_ref))]
    assert max(errs) < TOL[dtype], (shape, dtype, repeat, block, bwd, errs)


CUDA_CASES = [1, 2, 4, 5, 7, 8]   # on a GPU: float32 instead of float64, fewer cases (each new tiling compiles)


def check_inverse_triton(device):
    "The Triton counting sort gives inverse_routing's table bit for bit (same stable order)."
    from xwlearn.kernels.bra import inverse_routing, inverse_routing_triton
    g = torch.Generator().manual_seed(2)
    for B, n, topk in [(1, 3, 2), (3, 7, 3), (2, 49, 16), (2, 5, 5), (1, 4, 1)]:
        idx = torch.randint(0, n, (B, n, topk), generator=g).int().to(device)
        for a, b in zip(inverse_routing(idx), inverse_routing_triton(idx)):
            assert torch.equal(a, b), (B, n, topk, a, b)


def run_all_cases(device):
    check_inverse_triton(device)
    if device == "cuda":
        for i in CUDA_CASES:
            shape, kw = CASES[i]
            for bwd in (BWDS if i == 1 else ("v2", "atomic")):   # each tiling compiles per variant: keep it short
                check_case(shape, device=device, bwd=bwd, **{**kw, "dtype": kw.get("dtype", torch.float32)})
        return
    for shape, kw in CASES:
        for bwd in BWDS: check_case(shape, device=device, bwd=bwd, **kw)
    from xwlearn.kernels.bra import bra_attention
    try:
        from xwlearn.models.biformer import routed_attention     # the BiFormer module's gather reference
    except Exception:
        routed_attention = None
    if routed_attention is not None:
        q, k, v, idx = make(2, 2, 4, 49, 16, 2, device=device)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        o, o_ref = bra_attention(q, k, v, idx, scale=0.2), routed_attention(q, k, v, idx, scale=0.2)
        do = torch.randn_like(o)
        assert rel_err(o, o_ref) < 1e-10
        for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
            assert rel_err(a, b) < 1e-5
    q, k, v, idx = make(1, 2, 4, 4, 4, 2, device=device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for bwd in BWDS:
        assert torch.autograd.gradcheck(lambda q, k, v: bra_attention(q, k, v, idx, bwd=bwd), (q, k, v),
                                        fast_mode=True, atol=1e-5)


def _old_interpreter_new_numpy():
    from importlib.metadata import version
    import numpy as np
    ver = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])
    return ver(version("triton")) < (3, 7) and ver(np.__version__) >= (2, 4)


@pytest.mark.parametrize("device", ["cpu-interpreter",
                                    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="no CUDA GPU"))])
def test_bra_matches_dense_oracle(device):
    if device == "cuda":
        run_all_cases("cuda"); return
    if _old_interpreter_new_numpy():
        pytest.skip("Triton < 3.7's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 rejects")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, __file__, "--interpreter"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_inverse_routing():
    from xwlearn.kernels.bra import inverse_routing
    idx = torch.tensor([[[1, 2], [1, 0], [1, 1]]])
    ptr, invq = inverse_routing(idx)
    assert ptr.tolist() == [0, 1, 5, 6]
    assert [sorted(invq[ptr[j]:ptr[j + 1]].tolist()) for j in range(3)] == [[1], [0, 1, 2, 2], [0]]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 7, (3, 7, 3), generator=g)
    ptr, invq = inverse_routing(idx)
    for b in range(3):
        for j in range(7):
            want = sorted(i for i in range(7) for t in range(3) if idx[b, i, t] == j)
            assert sorted(invq[ptr[b * 7 + j]:ptr[b * 7 + j + 1]].tolist()) == want


def test_gather_reference_and_fallback():
    "The gather reference equals the oracle; on a CPU tensor without the interpreter bra_attention is that reference."
    from xwlearn.kernels import bra
    q, k, v, idx = make(2, 2, 9, 4, 8, 3, repeat=True)
    assert rel_err(bra.gather_bra(q, k, v, idx), oracle(q, k, v, idx)) < 1e-12
    if not bra.use_kernel(q):
        q.requires_grad_()
        o = bra.bra_attention(q, k, v, idx)
        assert rel_err(o, bra.gather_bra(q, k, v, idx)) == 0
        o.sum().backward(); assert q.grad is not None
    with pytest.raises(AssertionError, match="idx"): bra.bra_attention(q, k, v, idx + 9)
    with pytest.raises(AssertionError, match="idx"): bra.bra_attention(q, k, v, idx[:, :3])
    with pytest.raises(AssertionError, match="bwd"): bra.bra_attention(q, k, v, idx, bwd="v9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("B,hw,h,S,topk,dtype", [(4, 56, 2, 7, 1, torch.bfloat16), (4, 56, 2, 7, 4, torch.bfloat16),
                                                 (4, 28, 4, 7, 4, torch.bfloat16), (4, 14, 8, 7, 16, torch.bfloat16),
                                                 (1, 112, 4, 7, 4, torch.bfloat16), (1, 224, 2, 7, 4, torch.bfloat16),
                                                 (1, 56, 2, 8, 4, torch.bfloat16), (4, 56, 2, 7, 4, torch.float16),
                                                 (4, 28, 4, 7, 4, torch.float32)])
def test_cuda_biformer_shapes(B, hw, h, S, topk, dtype):
    "BiFormer stage shapes (64-, 16-, 4-, 256- and 49-token regions) against the fp32 gather reference."
    from xwlearn.kernels.bra import bra_attention, gather_bra
    n, T, d = S * S, (hw // S) ** 2, 32
    q, k, v, idx = make(B, h, n, T, d, topk, dtype=dtype, device="cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    o_ref = gather_bra(qr, kr, vr, idx)
    g_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.float())
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}[dtype]
    for bwd in BWDS:
        o = bra_attention(q, k, v, idx, bwd=bwd)
        grads = torch.autograd.grad(o, (q, k, v), do)
        errs = [rel_err(a, b) for a, b in zip((o, *grads), (o_ref, *g_ref))]
        assert max(errs) < tol, (bwd, errs)
    try:
        from xwlearn.models.biformer import routed_attention
    except Exception:   # the BiFormer module (or fastai) is not importable here
        return
    assert rel_err(o, routed_attention(qr, kr, vr, idx)) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_extra_memory_below_gather():
    "No gathered KV: one fwd+bwd at stage-1 top-4 allocates less than the gather design (and ~ the grads + o)."
    from xwlearn.kernels.bra import bra_attention, gather_bra
    q, k, v, idx = make(16, 2, 49, 64, 32, 4, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    peaks = {}
    for name, f in [("kernel", bra_attention), ("gather", gather_bra),
                    ("atomic", lambda *a: bra_attention(*a, bwd="atomic"))]:
        f(q, k, v, idx).backward(do); q.grad = k.grad = v.grad = None
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        f(q, k, v, idx).backward(do); torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        q.grad = k.grad = v.grad = None
    assert peaks["kernel"] < 0.5 * peaks["gather"], peaks
    assert peaks["atomic"] < 0.5 * peaks["gather"], peaks   # its fp32 dK/dV buffer: 8 bytes per element, + the cast
    assert peaks["kernel"] < 8 * q.numel() * q.element_size(), peaks   # o, dq, dk, dv, lse, delta + the routing table


if __name__ == "__main__" and "--interpreter" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    run_all_cases("cpu")
    print("ALL OK")


@pytest.mark.parametrize("shape, repeat", [((2, 3, 9, 4, 8, 3), False), ((1, 2, 4, 16, 8, 4), False), ((2, 2, 6, 4, 4, 3), True)])
def test_dense_masked_path_is_routed_attention(shape, repeat):
    "path='dense' (SDPA with the routing mask) equals the independent oracle, forward and gradients, in float64 —"
    " repeated regions included (log 2 in the mask, computed in float64)."
    from xwlearn.kernels import bra
    q, k, v, idx = make(*shape, repeat=repeat)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, o_ref = bra.bra_attention(q, k, v, idx, path="dense"), oracle(q, k, v, idx)
    assert rel_err(o, o_ref) < 1e-12
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_ref, (q, k, v), do)):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="path must be one of"): bra.bra_attention(q, k, v, idx, path="fastest")


def test_cost_rule_picks_per_stage(monkeypatch):
    "bra_path: short sequences with a small mask go dense, long ones (or a huge mask) to the kernel; thresholds are knobs."
    from xwlearn.kernels import bra
    stage = lambda B, n, T: torch.empty(B, 2, n, T, 32, dtype=torch.bfloat16, device="meta")
    assert [bra.bra_path(stage(64, 49, T), None) for T in (64, 16, 4)] == ["kernel", "dense", "dense"]
    assert bra.bra_path(stage(4096, 49, 16), None) == "kernel"                 # 4096 x 784^2 x 2 B = 5 GB mask
    monkeypatch.setattr(bra, "BRA_DENSE_MAX_TOKENS", 100)
    assert bra.bra_path(stage(64, 49, 16), None) == "kernel"
    q, k, v, idx = make(1, 2, 4, 4, 8, 2)                                      # 16 tokens: auto = dense, same numbers
    assert rel_err(bra.bra_attention(q, k, v, idx, path="auto"), oracle(q, k, v, idx)) < 1e-12


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real benchmark runs on the GPU (kernels/gpu_check.sh)")
def test_benchmark_script_dry_run_on_cpu(monkeypatch):
    "kernels/bench_bra.py end to end on CPU tensors (PyTorch fallback paths, tiny shapes and model, wall-clock timer):"
    " every peer row, the auto and masked-SDPA rows, and the whole-model case run and are checked — no GPU minutes lost to a script bug."
    import importlib.util, time, triton.testing as tt
    spec = importlib.util.spec_from_file_location("xw_bench_bra_dry", ROOT / "kernels/bench_bra.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    monkeypatch.setattr(tt, "do_bench", lambda fn, **kw: (lambda t: (fn(), 1e3 * (time.perf_counter() - t))[1])(time.perf_counter()))
    torch.manual_seed(0)
    r = mod.bench_case("tiny 8x8 h2 r4 top2", 2, 8, 2, 8, 4, 2, roof_gbps=1.0, flex=False, device="cpu", variants=("v2",))
    rows = r["rows"]
    assert {"official gather BRA", "full SDPA", "window SDPA", "masked SDPA (routed)", "xwlearn BRA (auto)",
            "xwlearn BRA (v2)"} <= set(rows), rows.keys()
    for name in ("masked SDPA (routed)", "xwlearn BRA (auto)", "xwlearn BRA (v2)", "official gather BRA"):
        assert rows[name].get("ok") and rows[name]["ms"] > 0, (name, rows[name])
    m = mod.bench_model("xw_biformer_tiny", B=2, img=32, device="cpu", impls=("gather", "auto"), auto_pad=True)
    assert all("error" not in v and v["ms"] > 0 for v in m["rows"].values()), m["rows"]
    assert max(v["err"] for v in m["rows"].values()) < 1e-5                  # same weights, same batch: same logits
