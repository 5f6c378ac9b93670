"""GPU benchmarks of xwlearn's kernels against their PyTorch references and peers.

Run: `make bench` (or `python kernels/bench.py [--only NAME] [--out kernels/results]`). Needs a CUDA GPU: on a
machine without one it prints why and exits 0. Each kernel notebook (`nbs/90_kernels/`) ships a script
`kernels/bench_<name>.py` with `bench(roof_gbps) -> dict(shape=..., rows={peer: dict(ms=..., ...)}, target=...)`;
this driver finds them, measures the device-to-device copy roof once, prints every row with its time ratio to
every other row, and records each result (card, versions, date, shapes) in `kernels/results/<gpu>.json`, next to the
benchmarks already recorded there.
Times are medians of `triton.testing.do_bench`.
"""
import argparse, importlib.util, json, platform, re, sys, time, traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def copy_roof_gbps(nbytes=2 * 2**30):
    "Device-to-device copy bandwidth (read + write), the memory roof every bandwidth-bound kernel is measured against."
    import torch, triton.testing as tt
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda"); b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * (nbytes // 2) * 2 / (ms * 1e-3) / 1e9


# the PyTorch references a benchmark times against (and, for Temporal RoI Align, the backward the kernel reuses)
REFERENCES = {"adax": ["xwlearn/optim/adax.py"], "relay": ["xwlearn/llm/relay.py"], "bra": ["xwlearn/models/biformer.py"],
              "ms_deform_attn": ["xwlearn/vision/detr.py"],
              "temporal_roi_align": ["xwlearn/detection/temporal_roi_align.py"]}


def code_version(name=None, root=HERE.parent):
    """Which code a result measured: the git commit, whether the files that decide the timing differ from it, and a
    content hash (sha1, 12 hex) of each — the kernel modules `xwlearn/kernels/*.py` and the script `kernels/bench_<name>.py`.
    A number without its code version cannot be compared with a later run of changed kernels."""
    import hashlib, subprocess
    files = sorted((root / "xwlearn" / "kernels").glob("*.py"))
    if name: files += [HERE / f"bench_{name}.py"] + [root / r for r in REFERENCES.get(name, ())]
    def git(*a):
        try: r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError): return None
        return r.stdout.strip() if r.returncode == 0 else None
    rel = [str(f.relative_to(root)) for f in files if f.exists()]
    dirty = git("status", "--porcelain", "--", *rel)
    return dict(commit=git("rev-parse", "HEAD"), dirty=None if dirty is None else bool(dirty),
                files={r: hashlib.sha1((root / r).read_bytes()).hexdigest()[:12] for r in rel})


def rel_l2(a, b):
    "Relative L2 error of `a` against the reference `b` (float32)."
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def median_ms(fn, **kw):
    "Median milliseconds of `fn` by `triton.testing.do_bench` (imported when called, so a dry run can replace it)."
    import triton.testing as tt
    return tt.do_bench(fn, return_mode="median", **kw)


def peak_gb(step, device):
    "(peak_gb, extra_gb) of one call of `step`: max allocated (inputs included) and its excess over what was held before; NaN off CUDA."
    import torch
    if device != "cuda": step(); return float("nan"), float("nan")
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 1e9, (peak - before) / 1e9


def run_cases(cases, bench_case, print_case, roof_gbps, **kw):
    """Run `bench_case(name, arg, roof_gbps, **kw)` for each `(name, arg)` of `cases`; a failing case becomes a row with
    its error and traceback instead of ending the run. Returns `(cases, rows)`: the case dicts (each with `wall_s`) and
    their rows keyed '<case> | <peer>'."""
    import sys, time, traceback
    out = []
    for name, arg in cases:
        t = time.time()
        try:
            r = bench_case(name, arg, roof_gbps, **kw)
        except Exception as e:
            r = dict(case=name, shape=name, rows={}, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        r["wall_s"] = time.time() - t
        out.append(r); print_case(r); sys.stdout.flush()
    return out, {f"{r['case']} | {p}": row for r in out for p, row in r["rows"].items()}


def discover(only=None):
    "The `bench` functions of `kernels/bench_<name>.py`, by name."
    found = {}
    for f in sorted(HERE.glob("bench_*.py")):
        name = f.stem[len("bench_"):]
        if only and name not in only: continue
        spec = importlib.util.spec_from_file_location(f"xw_bench_{name}", f)
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        found[name] = mod.bench
    return found


def print_result(name, r):
    print(f"\n== {name}: {r.get('shape', '')}")
    if r.get("target"): print(f"   target: {r['target']}")
    rows = r.get("rows", {})
    names = list(rows)
    print("   (speed-up vs P = P's time / this row's time; > 1: this row is faster)")
    for peer in names:
        row = rows[peer]
        if "ms" not in row or row["ms"] is None:
            print(f"  {peer:<40} {row.get('error', 'not run')}"); continue
        extra = "".join(f"  {k}={v:.3g}" if isinstance(v, float) else f"  {k}={v}" for k, v in row.items() if k != "ms")
        case = peer.split(" | ")[0] if " | " in peer else None  # rows named '<case> | <peer>' compare within a case
        ratios = "  ".join(f"speed-up {rows[o]['ms'] / row['ms']:.2f} vs {o.split(' | ')[-1]}" for o in names
                           if o != peer and rows[o].get("ms") and (case is None or o.startswith(case + " | ")))
        print(f"  {peer:<40} {row['ms']:9.4f} ms{extra}\n  {'':<40} {ratios}")
    for k, v in r.items():
        if k not in ("shape", "target", "rows"): print(f"   {k}: {v}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated names (the <name> of kernels/bench_<name>.py)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench: torch is not installed"); return 0
    benches = discover(a.only.split(",") if a.only else None)
    if not torch.cuda.is_available():
        print("bench: skipped — no CUDA GPU on this machine. The kernel benchmarks measure GPU time against the "
              f"memory/compute roof; run `make bench` on a machine with an NVIDIA GPU (found: {', '.join(benches) or 'none'}; "
              "results go to kernels/results/<gpu>.json).")
        return 0
    import triton
    gpu = torch.cuda.get_device_name()
    roof = copy_roof_gbps()
    run = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M"), copy_roof_gbps=roof)
    print(f"{gpu}: copy roof {roof:.0f} GB/s (torch {torch.__version__}, triton {triton.__version__})")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    f = out / (re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") + ".json")
    status = 0
    for name, fn in benches.items():
        try:
            r = fn(roof)
        except Exception as e:  # one failing kernel must not hide the others' numbers
            traceback.print_exc(); r = dict(error=f"{type(e).__name__}: {e}"); status = 1
        r = dict(r, code=code_version(name))
        print_result(name, r)
        torch.cuda.empty_cache()
        record(f, run, name, r)  # after each bench: a later crash keeps these
    print(f"\nwrote {f}")
    return status


def record(f, run, name, r):
    """Put bench `name`'s result `r` into the results file `f`, keeping every other bench already recorded there (a run
    of one benchmark must not erase the others' numbers). Each result carries its own run (`r["run"]`: card, versions,
    date, copy roof); the top-level fields describe the latest run. Written atomically (`xwlearn.core.atomic_write_text`)."""
    from xwlearn.core import atomic_write_text
    f = Path(f)
    res = json.loads(f.read_text()) if f.exists() else {}
    res.update(run)
    res.setdefault("benches", {})[name] = dict(r, run=run)
    atomic_write_text(f, json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    sys.exit(main())
