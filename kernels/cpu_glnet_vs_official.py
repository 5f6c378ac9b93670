"""CPU benchmark: xwlearn's GLNet against the official implementation, same weights, in one process.

`python kernels/cpu_glnet_vs_official.py --official PATH [--variant glnet_4g] [--batch 4] [--size 224] [--rounds 7]`
PATH is a local checkout of https://github.com/rayleizhu/GLMix (its `models/glnet.py` is imported from there, with
an inert stand-in for the `fairscale` import it needs only for activation checkpointing; nothing of it is copied here).
Without `--official` the script says so and exits 0 (a benchmark, not a test: nothing here is timed in the test suite).

Steps: the official model is built with random weights; `convert_official_glnet` maps its state dict onto
`timm.create_model('xw_<variant>')`; the float64 logits of both are compared; then, on one thread, forward (eval,
no grad) and forward+backward (train mode, as in training) of both models are timed in alternating runs
(official, ours, official, ours, ...) so that drifts of a shared machine hit both alike. Prints the median time of
each and the median of the per-round ratios ours / official (< 1: ours faster).
"""
import argparse, importlib.util, statistics, sys, time, types
from pathlib import Path
import torch
import timm
import xwlearn.models  # noqa: F401  registers xw_glnet_*
from xwlearn.models.glmix import convert_official_glnet


def load_official(path: Path):
    "Import `models/glnet.py` from a checkout; `fairscale` (activation checkpointing only) gets an inert stand-in."
    if 'fairscale' not in sys.modules:
        fs, fsn, fsc = (types.ModuleType(n) for n in ('fairscale', 'fairscale.nn', 'fairscale.nn.checkpoint'))
        fsc.checkpoint_wrapper = lambda m: m; fs.nn, fsn.checkpoint = fsn, fsc
        sys.modules.update({'fairscale': fs, 'fairscale.nn': fsn, 'fairscale.nn.checkpoint': fsc})
    spec = importlib.util.spec_from_file_location('glmix_official_glnet', path / 'models' / 'glnet.py')
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    return mod


def timed(fn, x):
    t = time.perf_counter(); fn(x); return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--official', type=Path, help='local checkout of rayleizhu/GLMix')
    ap.add_argument('--variant', default='glnet_4g', choices=['glnet_4g', 'glnet_9g', 'glnet_16g', 'glnet_stl'])
    ap.add_argument('--batch', type=int, default=4); ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--rounds', type=int, default=7); ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args(argv)
    if a.official is None or not (a.official / 'models' / 'glnet.py').exists():
        print('skipped: pass --official PATH, a local checkout of rayleizhu/GLMix (models/glnet.py)'); return 0
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    off = getattr(load_official(a.official), a.variant)()
    ours = timm.create_model('xw_' + a.variant)
    ours.load_state_dict(convert_official_glnet(off.state_dict()), strict=True)
    off.eval(); ours.eval()
    with torch.no_grad():   # same weights -> same function (float64)
        x64 = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        d = (off.double()(x64) - ours.double()(x64)).abs().max().item()
    off.float(); ours.float()
    print(f'{a.variant}: max |logits official - ours| (float64, 2x3x64x64) = {d:.2e}')
    x = torch.randn(a.batch, 3, a.size, a.size)

    def fwd(m):
        def f(x):
            with torch.no_grad(): m(x)
        return f

    def fwd_bwd(m):
        def f(x):
            m.zero_grad(set_to_none=True); m(x).sum().backward()
        return f

    for label, mode, make in (('forward (eval, no grad)', 'eval', fwd), ('forward+backward (train)', 'train', fwd_bwd)):
        for m in (off, ours): m.train(mode == 'train')
        fo, fu = make(off), make(ours)
        fo(x); fu(x)                                             # warm-up
        to, tu = [], []
        for r in range(a.rounds):
            pair = ((fo, to), (fu, tu)) if r % 2 == 0 else ((fu, tu), (fo, to))
            for fn, acc in pair: acc.append(timed(fn, x))
        ratio = statistics.median(u / o for u, o in zip(tu, to))
        print(f'{label}: official {statistics.median(to) * 1e3:.0f} ms, xwlearn {statistics.median(tu) * 1e3:.0f} ms, '
              f'ratio xwlearn/official {ratio:.3f} (median of {a.rounds} alternating rounds, batch {a.batch}, '
              f'{a.size}^2, {a.threads} thread(s))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
