"""Relay decode kernels (`xwlearn.kernels.relay`) against `xwlearn.llm.relay` and SDPA over the concatenated KV.

CPU: the Triton interpreter (TRITON_INTERPRET=1, small shapes). CUDA (when available): compiled kernels at the target shape.
"""
import importlib, os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA: os.environ["TRITON_INTERPRET"] = "1"
import xwlearn.kernels.relay as KR
if not CUDA and not KR._INTERPRET: KR = importlib.reload(KR)
from xwlearn.llm.relay import attention_lse, merge_attention, relay_attention

torch.set_num_threads(1)
DEVS = [pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="interpreter variant runs on CPU-only machines")),
        pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU"))]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
SMALL = [dict(B=3, H=4, Hk=2, Ls=37, Lr=9, D=16, lens=None, S=1, bm=None),
         dict(B=5, H=4, Hk=1, Ls=40, Lr=12, D=24, lens=[12, 1, 5, 0, 7], S=2, bm=16),
         dict(B=2, H=6, Hk=2, Ls=20, Lr=3, D=32, lens=[3, 2], S=3, bm=32),
         dict(B=17, H=2, Hk=2, Ls=24, Lr=5, D=16, lens=None, S=1, bm=16)]
BIG = [dict(B=64, H=32, Hk=32, Ls=4096, Lr=128, D=128, lens="rand", S=1, bm=None),
       dict(B=64, H=32, Hk=8, Ls=4096, Lr=128, D=128, lens="rand", S=1, bm=32),
       dict(B=7, H=32, Hk=8, Ls=1000, Lr=77, D=64, lens="rand", S=4, bm=64),
       dict(B=33, H=12, Hk=4, Ls=513, Lr=31, D=80, lens=None, S=2, bm=16)]


def problem(dev, dtype, B, H, Hk, Ls, Lr, D, lens, seed=0, **_):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    if lens == "rand": lens = torch.randint(0, Lr + 1, (B,), generator=g).tolist()
    rl = None if lens is None else torch.tensor(lens, device=dev)
    return r(B, H, 1, D), r(Hk, Ls, D), r(Hk, Ls, D), r(B, Hk, Lr, D), r(B, Hk, Lr, D), rl


def cases(dev): return SMALL if dev == "cpu" else BIG


def sdpa_concat_ref(q, ks, vs, kr, vr, rl):
    "Independent oracle: SDPA (fp32) over the materialised concatenated keys with a padding mask."
    B, H = q.shape[:2]; Hk, Ls = ks.shape[:2]; G = H // Hk
    k = torch.cat([ks[None].expand(B, -1, -1, -1), kr], 2).float().repeat_interleave(G, 1)
    v = torch.cat([vs[None].expand(B, -1, -1, -1), vr], 2).float().repeat_interleave(G, 1)
    mask = None
    if rl is not None: mask = (torch.arange(k.shape[2], device=q.device) < Ls + rl[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_lse_merge(dev, dtype, tol):
    q, ks, vs, kr, vr, _ = problem(dev, dtype, **(SMALL[0] if dev == "cpu" else BIG[1]))
    n = kr.shape[2] // 3
    o1, l1 = attention_lse(q, kr[:, :, :n], vr[:, :, :n]); o2, l2 = attention_lse(q, kr[:, :, n:], vr[:, :, n:])
    o, l = KR.lse_merge(o1, l1, o2, l2); om, lm = merge_attention(o1, l1, o2, l2)
    torch.testing.assert_close(o.float(), om.float(), rtol=tol, atol=tol); torch.testing.assert_close(l, lm)
    e = torch.full_like(l1, float("-inf"))
    o, l = KR.lse_merge(o1, e, o2, e)
    assert (o == 0).all() and torch.isneginf(l).all()


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("i", range(3))
def test_flash_decode(dev, dtype, tol, i):
    c = cases(dev)[i]
    q, ks, vs, kr, vr, rl = problem(dev, dtype, **c)
    k = torch.cat([ks[None].expand(q.shape[0], -1, -1, -1), kr], 2); v = torch.cat([vs[None].expand(q.shape[0], -1, -1, -1), vr], 2)
    lens = None if rl is None else rl + ks.shape[1]
    o, l = KR.flash_decode(q, k, v, kv_lens=lens, num_splits=None if i == 0 else c["S"], block_n=16 if dev == "cpu" else 64)
    o_ref, l_ref = attention_lse(q, k, v, kv_lens=lens)
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(l, l_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("i", range(4))
def test_relay_decode(dev, dtype, tol, i):
    c = cases(dev)[i]
    q, ks, vs, kr, vr, rl = problem(dev, dtype, **c)
    o = KR.relay_decode(q, ks, vs, kr, vr, req_lens=rl, num_splits=c["S"], block_m=c["bm"], block_n=16 if dev == "cpu" else 64)
    o_ref = relay_attention(q.float(), ks.float(), vs.float(), kr.float(), vr.float(), req_lens=rl)
    torch.testing.assert_close(o_ref, sdpa_concat_ref(q, ks, vs, kr, vr, rl), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.float(), o_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("Lr, lens, S", [(5, None, 1), (5, [5, 0, 2], 2), (0, None, 1)])
def test_relay_decode_empty_system_prompt(dev, Lr, lens, S):
    "L_sys = 0 (no shared prefix): the kernel is plain decode over each request's KV (it crashed with a division by zero);"
    " no keys at all gives 0 and an LSE of −inf, not NaN."
    q, ks, vs, kr, vr, rl = problem(dev, torch.float32, B=3, H=4, Hk=2, Ls=0, Lr=Lr, D=16, lens=lens)
    o, l = KR.relay_decode(q, ks, vs, kr, vr, req_lens=rl, num_splits=S, return_lse=True)
    o_ref, l_ref = attention_lse(q, kr, vr, kv_lens=rl)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, relay_attention(q, ks, vs, kr, vr, req_lens=rl), rtol=1e-5, atol=1e-5)
    assert not o.isnan().any() and torch.equal(torch.isneginf(l), torch.isneginf(l_ref))


@pytest.mark.parametrize("dev", DEVS)
def test_relay_decode_lse_and_two_pass(dev):
    "The LSE of the fused kernel, and flash_decode ×2 + lse_merge (the paper's design from our kernels)."
    q, ks, vs, kr, vr, rl = problem(dev, torch.float32, **cases(dev)[1])
    o, l = KR.relay_decode(q, ks, vs, kr, vr, req_lens=rl, return_lse=True)
    o_s, l_s = KR.flash_decode(q.transpose(0, 2), ks[None], vs[None])
    o_r, l_r = KR.flash_decode(q, kr, vr, kv_lens=rl)
    o2, l2 = KR.lse_merge(o_s.transpose(0, 2), l_s.transpose(0, 2), o_r, l_r)
    torch.testing.assert_close(o, o2, rtol=1e-5, atol=1e-5); torch.testing.assert_close(l, l2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_baselines(dev, dtype):
    "The two benchmark peers compute the same attention: SDPA over the concatenated KV and the official design."
    q, ks, vs, kr, vr, rl = problem(dev, dtype, **cases(dev)[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    o_ref = relay_attention(q.float(), ks.float(), vs.float(), kr.float(), vr.float(), req_lens=rl)
    kc, vc = KR.concat_kv(ks, vs, kr, vr)
    L, qc = ks.shape[1], q
    if dev == "cpu" and dtype == torch.float16: kc, vc, qc = kc.float(), vc.float(), q.float()  # CPU SDPA fp16 is slow/limited
    torch.testing.assert_close(KR.sdpa_concat(qc, kc, vc, L_sys=L, req_lens=rl).float(), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(KR.relay_official(q, ks, vs, kr, vr, req_lens=rl).float(), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(KR.relay_official(q, ks, vs, kr, vr).float(),
                               relay_attention(q.float(), ks.float(), vs.float(), kr.float(), vr.float()), rtol=tol, atol=tol)


@pytest.mark.parametrize("dev", DEVS)
def test_int64_index_path_matches(dev, monkeypatch):
    "The 64-bit index variant (taken when a tensor spans ≥ 2³¹ elements) gives the same result as the 32-bit one."
    c = SMALL[1]; q, ks, vs, kr, vr, rl = problem(dev, torch.float32, **c)
    run = lambda: (KR.relay_decode(q, ks, vs, kr, vr, req_lens=rl, num_splits=2, block_n=16),   # split-K: 2 programs
                   *KR.flash_decode(q.transpose(0, 2), ks[None], vs[None], num_splits=2, block_n=16))  # + combine
    r32 = run()
    real, seen = KR._needs_i64, []
    monkeypatch.setattr(KR, "_needs_i64", lambda *ts: seen.append(len(ts)) or True)
    r64 = run()
    assert seen == [6, 1, 4, 1]                               # relay_decode + its combine, flash_decode + its combine
    for a, b in zip(r64, r32): torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not real(q, torch.empty(1).expand(2**16, 2**15 - 1)) and real(q, torch.empty(1).expand(2**16, 2**15))


def test_flash_decode_batch_heads_on_unbounded_grid_axis(monkeypatch):
    "B·H_kv = 70,000 programs go on grid axis 0 (CUDA limits axes 1 and 2 to 65,535)."
    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid); return lambda *a, **k: None
    monkeypatch.setattr(KR, "_flash_decode_kernel", Spy())
    monkeypatch.setattr(KR, "_use_triton", lambda *ts: True)
    B, Hk, D = 35_000, 2, 16
    q = torch.zeros(B, 2 * Hk, 1, D); k = torch.zeros(B, Hk, 8, D)
    KR.flash_decode(q, k, k, num_splits=1)
    assert grids[0][0] == B * Hk and max(grids[0][1:]) <= 65_535


@pytest.mark.skipif(CUDA, reason="the real benchmark runs on the GPU (kernels/gpu_check.sh)")
def test_benchmark_script_dry_run_on_cpu(monkeypatch):
    "kernels/bench_relay.py end to end on CPU tensors (interpreter, tiny shapes, a wall-clock timer): no GPU minutes lost to a script bug."
    import importlib.util, time, triton.testing as tt
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("xw_bench_relay_dry", Path(__file__).parents[1] / "kernels/bench_relay.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "DEV", "cpu")
    monkeypatch.setattr(mod, "SHAPES", [dict(B=2, H=4, H_kv=4, L_sys=20, L_req=3, D=16),     # MHA and GQA, tiny
                                        dict(B=2, H=4, H_kv=2, L_sys=20, L_req=3, D=16)])
    monkeypatch.setattr(mod, "_configs", lambda G: [dict(block_m=16, num_splits=1, block_n=16, num_warps=4, num_stages=2),
                                                    dict(block_m=16, num_splits=2, block_n=16, num_warps=4, num_stages=2)])

    def do_bench(fn, return_mode="median"):
        t = time.perf_counter(); fn(); return 1e3 * (time.perf_counter() - t)

    def no_graphs(fn, return_mode="median"): raise RuntimeError("no CUDA graphs on the CPU")   # the eager fallback path
    monkeypatch.setattr(tt, "do_bench", do_bench)
    monkeypatch.setattr(tt, "do_bench_cudagraph", no_graphs)
    r = mod.bench(roof_gbps=1.0)
    names = {"SDPA over concatenated KV", "official design (PyTorch flash+LSE x2, merge)", "xwlearn flash_decode x2 + lse_merge",
             "xwlearn relay_decode (one kernel)", "xwlearn relay_decode (split-K + combine)"}
    assert set(r["rows"]) == {f"[H_kv={h}] {n}" for h in (4, 2) for n in names}
    for k, v in r["rows"].items():
        assert "error" not in v and v["ms"] > 0 and v["rel_err"] < 5e-3, (k, v)
    assert isinstance(r["met"], bool) and len(r["per_shape"]["H_kv=2"]["sweep"]) == 2
