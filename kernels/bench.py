"""GPU benchmarks of xwlearn's kernels against their PyTorch references and peers.

Run: `make bench` (or `python kernels/bench.py [--only NAME] [--out kernels/results]`). Needs a CUDA GPU: on a
machine without one it prints why and exits 0. Each benchmark reports the median time (`triton.testing.do_bench`),
the ratio to each peer, and the fraction of the memory-bandwidth roof it reaches (bytes moved / time / measured
device-to-device copy bandwidth). Results go to `kernels/results/<gpu>.json`.

Kernel notebooks (`nbs/90_kernels/`) add their benchmark here as a function `bench_<name>(roof) -> dict`.
"""
import argparse, json, re, sys, time
from pathlib import Path


def copy_roof_gbps(nbytes=2 * 2**30):
    "Device-to-device copy bandwidth (read + write), the memory roof every elementwise kernel is measured against."
    import torch, triton.testing as tt
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda"); b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def bench_adax_step(roof_gbps, n_params=256 * 2**20, n_tensors=64):
    "One optimiser step over `n_params` fp32 parameters in `n_tensors` tensors: AdaX (xwlearn) vs torch Adam."
    import torch, triton.testing as tt
    from xwlearn.optim.adax import AdaXW
    sizes = [n_params // n_tensors] * n_tensors
    def params():
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in sizes]
        for p in ps: p.grad = torch.randn_like(p)
        return ps
    rows = {}
    peers = {"torch Adam(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
             "torch Adam(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
             "xwlearn AdaXW": lambda ps: AdaXW(ps, lr=1e-3)}
    for name, make in peers.items():
        opt = make(params()); opt.step()
        ms = tt.do_bench(opt.step)
        rows[name] = dict(ms=ms, gbps=28 * n_params / (ms * 1e-3) / 1e9)  # p, g, m, v read + p, m, v written: 28 B
        rows[name]["roof_frac"] = rows[name]["gbps"] / roof_gbps
    base = rows["torch Adam(fused=True)"]["ms"]
    for r in rows.values(): r["vs_fused_adam"] = r["ms"] / base
    return dict(shape=f"{n_params} fp32 params in {n_tensors} tensors", rows=rows)


BENCHES = {"adax_step": bench_adax_step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"one of {sorted(BENCHES)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench: torch is not installed"); return 0
    if not torch.cuda.is_available():
        print("bench: skipped — no CUDA GPU on this machine. The kernel benchmarks measure GPU time against the "
              "memory/compute roof; run `make bench` on a machine with an NVIDIA GPU (results: kernels/results/<gpu>.json).")
        return 0
    gpu = torch.cuda.get_device_name()
    roof = copy_roof_gbps()
    res = dict(gpu=gpu, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), copy_roof_gbps=roof, benches={})
    print(f"{gpu}: copy roof {roof:.0f} GB/s")
    for name, fn in BENCHES.items():
        if a.only and name != a.only: continue
        r = fn(roof); res["benches"][name] = r
        print(f"\n{name} ({r['shape']})")
        for peer, row in r["rows"].items():
            print(f"  {peer:<28} {row['ms']:8.3f} ms  {row['gbps']:7.0f} GB/s  {100*row['roof_frac']:5.1f}% of roof"
                  f"  {row['vs_fused_adam']:.2f}x fused Adam")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    f = out / (re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") + ".json")
    f.write_text(json.dumps(res, indent=1)); print(f"\nwrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
