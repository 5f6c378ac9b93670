"""GPU benchmark of xwlearn's streaming top-k kernel for Temporal RoI Align against the PyTorch oracle.

`bench(roof_gbps)` -> dict(shape, rows, target, cases, met): at the shapes of issue 35 — 300 RoIs of 7x7 pixels,
C = 512, a 38x63 reference map (600x1000 at stride 16), K = 2, fp32; 2 reference frames (training) and 14 (testing) —
it times, in the same run:
  - "PyTorch reference": `xwlearn.detection.temporal_roi_align.most_similar_roi_align` (the kernel's oracle: the full
    (RoI pixels, T, HW) similarity tensor, repeated argmax, gathers);
  - "torch.compile(reference)": the same function through `torch.compile` (inductor);
  - "xwlearn kernel (ieee)", "xwlearn kernel (tf32)": `xwlearn.kernels.temporal_roi_align.most_similar_roi_align` with
    the similarity dot in full fp32 (the oracle's selection) or TF32 (tensor cores; near-ties may pick other positions),
    each at the tiles of CONFIGS; the row keeps the fastest correct one ("config") and lists all ("configs": forward ms).
Every row is first checked against the reference (output and both input gradients, relative L2 error; "index_agree":
the fraction of chosen positions equal to the reference's — fp32 near-ties may differ), then timed with the checks freed.
Row fields: fwd_ms (median forward under no_grad — the test-time use), ms (median forward + backward), fwd_peak_gb /
peak_gb (`max_memory_allocated` during one call, inputs included), fwd_extra_gb / extra_gb (above what was allocated
before), err, ok, gbps / roof_frac (the forward's floor bytes — unit RoI pixels and reference pixels read once per
RoI block, output written — over the forward time), speedup_vs_<peer> (peer forward time / this forward time).
Run alone: `python kernels/bench_temporal_roi_align.py` (= `python kernels/bench.py --only temporal_roi_align`).
"""
import math, sys, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # the repo root: import xwlearn without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))           # kernels/: the shared roof measurement
from bench import copy_roof_gbps, run_cases, rel_l2 as _rel_l2, median_ms as _time, peak_gb as _peak
__all__ = ["bench", "bench_case", "copy_roof_gbps"]

CASES = [("2 refs", 2), ("14 refs", 14)]              # (name, reference frames)
SHAPE = dict(n_rois=300, C=512, H=38, W=63, k=2)      # the anchor shape
VARIANTS = ("ieee", "tf32")                           # the similarity dot's input_precision
CONFIGS = ({}, dict(block_p=64, block_s=64), dict(block_p=128, block_s=64, num_warps=8),
           dict(block_p=32, block_s=128, num_warps=8), dict(block_p=16, block_s=64))
TOL = 1e-3                                            # relative L2 error vs the fp32 reference
TARGET = ("14 refs, forward: the best ieee kernel (the oracle's selection) >= 3x faster than the PyTorch reference (H100 anchor for the reference: "
          "2 refs 3.7 ms / 0.44 GB, 14 refs 23.2 ms / 2.53 GB). Memory: the kernel's output (T, n, C, 7, 7) alone "
          "bounds the reduction near 5x without a graph (see the kernel notebook), so '>= 10x less' is reported, not met")
REF, COMPILED, MINE = "PyTorch reference", "torch.compile(reference)", "xwlearn kernel"


def make_inputs(n_rois, C, T, H, W, device="cuda", dtype=None, seed=0):
    "roi_feats (n, C, 7, 7) and ref_feats (T, C, H, W): ReLU-like non-negative features, as a backbone's."
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n_rois, C, 7, 7, device=device, dtype=dtype or torch.float32, generator=g).relu()
    f = torch.randn(T, C, H, W, device=device, dtype=dtype or torch.float32, generator=g).relu()
    return x, f


def bench_case(name, T, roof_gbps, n_rois=SHAPE["n_rois"], C=SHAPE["C"], H=SHAPE["H"], W=SHAPE["W"], k=SHAPE["k"],
               dtype=None, device="cuda", compile_backend="inductor", variants=VARIANTS, configs=CONFIGS):
    import torch
    from xwlearn.detection.temporal_roi_align import most_similar_roi_align as reference
    from xwlearn.kernels.temporal_roi_align import most_similar_roi_align
    torch.manual_seed(0)
    x, f = make_inputs(n_rois, C, T, H, W, device, dtype)
    ins = [t.requires_grad_() for t in (x, f)]
    peers = {REF: lambda: reference(x, f, k, return_index=True)}
    try:
        cref = torch.compile(reference, backend=compile_backend)
        peers[COMPILED] = lambda: cref(x, f, k, return_index=True)
    except Exception as e:                                             # an old torch without compile
        peers[COMPILED] = e
    cfg_name = lambda c: ",".join(f"{a}={v}" for a, v in c.items()) or "default"
    for var in variants:
        for cfg in configs:
            peers[f"{MINE} ({var}) [{cfg_name(cfg)}]"] = (
                lambda var=var, cfg=cfg: most_similar_roi_align(x, f, k, return_index=True, precision=var, **cfg))
    out_ref, idx_ref = reference(x, f, k, return_index=True)           # the check: the reference's own numbers
    dout = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad(out_ref, ins, dout)
    out_ref = out_ref.detach()
    rows = {}
    for pname, fn in peers.items():                                    # 1. check every row against the reference
        if isinstance(fn, Exception):
            rows[pname] = dict(ms=float("nan"), error=f"{type(fn).__name__}: {fn}"[:300]); continue
        try:
            out, idx = fn()
            grads = torch.autograd.grad(out, ins, dout)
            err = max(_rel_l2(out, out_ref), *(_rel_l2(a, b) for a, b in zip(grads, g_ref)))
            rows[pname] = dict(err=err, ok=err < TOL, index_agree=(idx == idx_ref).float().mean().item())
            if not err < TOL: rows[pname].update(ms=float("nan"), error="wrong result: not timed")
            del out, idx, grads
        except Exception as e:                                         # report, don't abort the other rows
            rows[pname] = dict(ms=float("nan"), error=f"{type(e).__name__}: {e}"[:300], trace=traceback.format_exc()[-2000:])
        if device == "cuda": torch.cuda.empty_cache()
    del out_ref, g_ref, idx_ref                                        # 2. then memory and time, the checks freed
    P, HW = n_rois * 49, H * W
    floor = (P * C + T * HW * C * math.ceil(P / 32) + P * T * C) * x.element_size()   # (block_p = 32)
    for pname, fn in peers.items():
        row = rows[pname]
        if "error" in row: continue
        try:
            def fwd():
                with torch.no_grad(): fn()
            def step():
                fn()[0].backward(dout)
            row["fwd_peak_gb"], row["fwd_extra_gb"] = _peak(fwd, device)
            row["peak_gb"], row["extra_gb"] = _peak(step, device)
            for t in ins: t.grad = None
            row["fwd_ms"] = _time(fwd)
            row["ms"] = _time(step, grad_to_none=ins)
            row["gbps"] = floor / (row["fwd_ms"] * 1e-3) / 1e9
            row["roof_frac"] = row["gbps"] / roof_gbps
        except Exception as e:
            row.update(ms=float("nan"), error=f"{type(e).__name__}: {e}"[:300])
            if MINE in pname: row["trace"] = traceback.format_exc()[-2000:]
        for t in ins: t.grad = None
        if device == "cuda": torch.cuda.empty_cache()
    for var in variants:                                               # per precision, keep its fastest correct tile
        pre = f"{MINE} ({var}) "
        mine = {p: r for p, r in rows.items() if p.startswith(pre)}
        good = {p: r for p, r in mine.items() if r.get("ok") and r.get("fwd_ms") == r.get("fwd_ms")}
        best = min(good or mine, key=lambda p: (good or mine)[p]["fwd_ms"] if p in good else math.inf)
        for p in mine: rows.pop(p)
        rows[pre.strip()] = dict(mine[best], config=best[len(pre) + 1:-1],
                                 configs={p[len(pre) + 1:-1]: r.get("fwd_ms") for p, r in mine.items()})
    for r in rows.values():
        for p2, r2 in rows.items():
            if r.get("fwd_ms") == r.get("fwd_ms") and r2.get("fwd_ms") == r2.get("fwd_ms") and r is not r2:
                r["speedup_vs_" + p2] = r2["fwd_ms"] / r["fwd_ms"]           # > 1: this row is faster than p2
    return dict(case=name, shape=f"{name}: {n_rois} RoIs x 7x7, C={C}, T={T} refs of {H}x{W}, K={k}, "
                                 f"{str(x.dtype).replace('torch.', '')}", rows=rows, floor_bytes=floor, target=TARGET)


def verdict(res):
    "Is the speed target met at 14 refs? (the ieee kernel's forward — same selection as the oracle — vs the reference's, same run)."
    rows = res["rows"]
    ref, mine = rows.get(REF, {}), rows.get(f"{MINE} (ieee)", {})
    if not (mine.get("ok") and mine.get("fwd_ms") == mine.get("fwd_ms") and ref.get("fwd_ms") == ref.get("fwd_ms")):
        return None
    return bool(ref["fwd_ms"] / mine["fwd_ms"] >= 3)


def bench(roof_gbps, cases=CASES, **kw):
    "Every case; rows keyed '<case> | <peer>'."
    out, rows = run_cases(cases, bench_case, print_case, roof_gbps, **kw)
    last = next((r for r in out if r["case"] == "14 refs"), None)
    return dict(shape="Temporal RoI Align most-similar align, issue-35 shapes (see cases)", rows=rows, target=TARGET,
                cases=out, met=verdict(last) if last and "error" not in last else None)


def print_case(r):
    print(f"\n{r['shape']}  ({r.get('wall_s', 0):.0f} s)")
    if "error" in r: print("  ERROR", r["error"]); print(r.get("trace", ""))
    base = r["rows"].get(REF, {}).get("fwd_ms")
    for p, row in r["rows"].items():
        if "error" in row:
            print(f"  {p:<26} {row['error']}"); continue
        s = (f"  {p:<26} fwd {row['fwd_ms']:8.3f} ms  fwd+bwd {row['ms']:8.3f} ms  fwd peak "
             f"{row.get('fwd_peak_gb', math.nan):5.2f} GB  fwd+bwd peak {row.get('peak_gb', math.nan):5.2f} GB"
             f"  err {row['err']:.1e}  idx {row['index_agree']:.4f}")
        if base: s += f"  {base / row['fwd_ms']:5.2f}x vs reference (fwd)"
        print(s)


if __name__ == "__main__":   # = `python kernels/bench.py --only temporal_roi_align [--out DIR]`
    from bench import main
    sys.exit(main(["--only", "temporal_roi_align", *sys.argv[1:]]))
