"""Issue 14 reliability probes: one probe per failure class, run against whichever xwlearn is importable.

Run: `XWLEARN_THREADS=1 python tests/probes/reliability.py [PROBE ...]` (about 20 s). To compare with an older commit:
`git worktree add /tmp/oldtree <commit>` and run with `PYTHONPATH=/tmp/oldtree` from outside the checkout.
Not collected by pytest: each failure class has its own test in tests/ or in its notebook; this script asks the
questions a new user asked, against any version.
Outcomes: ok (correct, or a clear error naming the argument/file), silent (wrong result / bad input accepted without a word),
loss (finished work or data lost/overwritten, or foreign code ran), crash (an unclear exception or a hang)."""
import os, sys, io, json, pickle, shutil, subprocess, tempfile, time, traceback, warnings, contextlib, math, hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

torch.set_num_threads(1)
import xwlearn
TREE = Path(xwlearn.__file__).resolve().parent.parent
TAG = os.environ.get("PROBE_TAG") or ("OLD" if "oldtree" in str(TREE) else "NEW")
print(f"xwlearn imported from {xwlearn.__file__}  ->  {TAG}", flush=True)

from fastai.callback.core import Callback, CancelFitException
from xwlearn.core import get_recipe
from xwlearn.recipes import train
from xwlearn.data import write_cifar10_pickles, make_shapes_classification, CIFAR10_CLASSES

ROOT = Path(tempfile.mkdtemp(prefix=f"probes_{TAG}_"))
RANK = {"ok": 0, "crash": 1, "silent": 2, "loss": 3, "skipped": -1}
PROBES, RESULTS = [], []

def probe(fn): PROBES.append(fn); return fn

def worst(outs): return max(outs, key=lambda o: RANK[o])

def msg(e, n=160): return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"

def clear(e, *names) -> bool:
    "A clear error: ValueError/TypeError (or subclasses, incl. DatasetLayoutError, RunFolderError) whose message names one of `names`."
    s = str(e)
    return isinstance(e, (ValueError, TypeError, pickle.UnpicklingError)) and any(n.lower() in s.lower() for n in names)

@contextlib.contextmanager
def caught():
    "Record warnings; the list is yielded."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield w

def quiet_call(f, *a, **kw):
    "Call f with stdout captured (train prints); returns (result, stdout text)."
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): r = f(*a, **kw)
    return r, buf.getvalue()

# ------------------------------------------------------------------------------------------------------------- fixtures
_rng = np.random.default_rng(0)
CIFAR = ROOT/"cifar"  # 96 train + 32 test images, labels 0..9
write_cifar10_pickles(CIFAR, _rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8), _rng.integers(0, 10, 96),
                      _rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), _rng.integers(0, 10, 32))

class Kill(Callback):
    "Simulate a kill after epoch 0 has been checkpointed."
    order = 99
    def after_epoch(self):
        if self.epoch == 0: raise CancelFitException

@contextlib.contextmanager
def patched_recipe(name, *cbs):
    r = get_recipe(name); orig = r.fn
    def fn(data, epochs, smoke=False, **kw):
        learn = orig(data, epochs=epochs, smoke=smoke, **kw)
        for cb in cbs: learn.add_cb(cb if isinstance(cb, Callback) else cb())
        return learn
    r.fn = fn
    try: yield
    finally: r.fn = orig

def unfinished_run(out, name="smoke_cifar10", epochs=2, seed=0):
    "A run of `name` killed after its first epoch (last.pth of epoch 0, no model.pth)."
    with patched_recipe(name, Kill): quiet_call(train, name, CIFAR, epochs=epochs, smoke=True, out_dir=out, seed=seed, quiet=True)
    assert (out/"last.pth").exists() and not (out/"model.pth").exists()

def sha(p): return hashlib.sha1(Path(p).read_bytes()).hexdigest()

# ======================================================================================================= training/resume
@probe
def resume_weights_equal():
    name = "adax_cifar10_resnet20"
    kw = dict(epochs=2, smoke=True, quiet=True)
    a, _ = quiet_call(train, name, CIFAR, out_dir=ROOT/"rw_a", **kw)
    a2, _ = quiet_call(train, name, CIFAR, out_dir=ROOT/"rw_a2", **kw)
    with patched_recipe(name, Kill): quiet_call(train, name, CIFAR, out_dir=ROOT/"rw_b", **kw)
    b, _ = quiet_call(train, name, CIFAR, out_dir=ROOT/"rw_b", resume=True, **kw)
    dw = lambda m1, m2: max((x.float() - y.float()).abs().max().item()
                            for x, y in zip(m1.model.state_dict().values(), m2.model.state_dict().values()))
    d_aa, d_ab = dw(a, a2), dw(a, b)
    det = f"uninterrupted x2 max|dW|={d_aa:.3g}; killed@epoch0+resume vs uninterrupted max|dW|={d_ab:.3g}"
    if d_aa != 0: return "silent", "two uninterrupted runs differ; " + det
    return ("ok" if d_ab == 0 else "silent"), det

@probe
def new_run_over_finished_run():
    out = ROOT/"fin"
    quiet_call(train, "smoke_cifar10", CIFAR, epochs=1, smoke=True, out_dir=out, quiet=True)
    h = sha(out/"model.pth")
    try: quiet_call(train, "smoke_cifar10", CIFAR, epochs=1, smoke=True, out_dir=out, seed=1, quiet=True)
    except Exception as e:
        ok = clear(e, str(out), "--resume", "overwrite")
        return ("ok" if ok and sha(out/"model.pth") == h else "crash"), "second run refused: " + msg(e)
    return ("loss" if sha(out/"model.pth") != h else "silent"), f"second run (seed 1) accepted; model.pth {'REPLACED' if sha(out/'model.pth') != h else 'kept'}"

@probe
def resume_without_checkpoint():
    out = ROOT/"nock"
    try: _, so = quiet_call(train, "smoke_cifar10", CIFAR, epochs=1, smoke=True, out_dir=out, resume=True, quiet=True)
    except Exception as e: return ("ok" if clear(e, str(out), "resume") else "crash"), "refused: " + msg(e)
    return "silent", f"--resume on an empty folder trained from scratch without a word (model.pth: {(out/'model.pth').exists()})"

@probe
def resume_changed_provenance():
    base = ROOT/"prov"; unfinished_run(base)  # epochs=2, smoke=True, seed=0
    res = {}
    for label, kw in (("epochs 2->3", dict(epochs=3, smoke=True, seed=0)), ("seed 0->1", dict(epochs=2, smoke=True, seed=1)),
                      ("smoke True->False", dict(epochs=2, smoke=False, seed=0))):
        out = ROOT/f"prov_{label.split()[0]}"; shutil.copytree(base, out)
        try:
            quiet_call(train, "smoke_cifar10", CIFAR, out_dir=out, resume=True, quiet=True, **kw)
            meta = torch.load(out/"last.pth", weights_only=True)["meta"]
            res[label] = ("silent", f"accepted, last.pth meta now {dict((k, meta.get(k)) for k in ('epochs', 'seed', 'smoke'))}")
        except Exception as e:
            res[label] = ("ok" if clear(e, "epochs", "seed", "smoke") else "crash", msg(e, 90))
    return worst([o for o, _ in res.values()]), "; ".join(f"{k}: {o} ({d})" for k, (o, d) in res.items())

@probe
def stale_atomic_tmp_removed():
    out = ROOT/"tmpf"; unfinished_run(out)
    (out/".last.pth.abc.tmp").write_bytes(b"partial" * 100)
    quiet_call(train, "smoke_cifar10", CIFAR, epochs=2, smoke=True, out_dir=out, resume=True, quiet=True)
    gone = not (out/".last.pth.abc.tmp").exists()
    return ("ok" if gone else "silent"), f".last.pth.abc.tmp {'removed' if gone else 'still there after the resumed run'}"

@probe
def smoke_uses_smoke_subset():
    learn = get_recipe("smoke_cifar10").fn(CIFAR, epochs=1, smoke=True)
    n = len(learn.dls.train.dataset)
    return ("ok" if n <= 64 else "silent"), f"--smoke on a 96-image CIFAR folder trains on {n} images"

@probe
def ema_weights_saved():
    from xwlearn.repro.kit import EMACallback
    out = ROOT/"ema"
    with patched_recipe("smoke_cifar10", lambda: EMACallback(0.9)):
        quiet_call(train, "smoke_cifar10", CIFAR, epochs=1, smoke=True, out_dir=out, quiet=True)
    ck = torch.load(out/"last.pth", weights_only=True)
    has_pth, has_cb = (out/"model_ema.pth").exists(), "EMACallback" in ck.get("cbs", {})
    return ("ok" if has_pth and has_cb else "loss"), f"model_ema.pth: {has_pth}; 'EMACallback' in last.pth['cbs']: {has_cb}"

@probe
def mage_endpoint_results_kept():
    import requests
    from xwlearn.repro.mage import mage_memoryarena_endpoint, write_memoryarena_fixture
    data = write_memoryarena_fixture(ROOT/"ma", n_tasks=2, n_sub=3)
    calls = [0]; fail_at = [31]
    class Resp:
        def __init__(self, code, content): self.status_code, self._c = code, content
        def raise_for_status(self):
            if self.status_code >= 400: raise requests.HTTPError(f"{self.status_code} Client Error: fake")
        def json(self): return {"choices": [{"message": {"content": self._c}}]}
    class Sess:
        def post(self, url, headers=None, json=None, timeout=None):
            calls[0] += 1
            if calls[0] == fail_at[0]: return Resp(400, "")
            p = json["messages"][0]["content"]
            return Resp(200, "OK" if p.startswith("### VALIDATE") else "summary line" if p.startswith("### SUMMARIZE") else "answer 5")
    old_sess, env0 = requests.Session, {k: os.environ.get(k) for k in ("XWLEARN_LLM_BASE_URL", "XWLEARN_LLM_MODEL", "OPENAI_API_KEY")}
    requests.Session = Sess
    os.environ.update(XWLEARN_LLM_BASE_URL="http://fake.invalid:8000/v1", XWLEARN_LLM_MODEL="fake", OPENAI_API_KEY="")
    out = ROOT/"ma_out"; out.mkdir()
    try:
        try: mage_memoryarena_endpoint(data, epochs=1, smoke=False, out_dir=out); return "crash", "call 31 failed but the run did not raise"
        except requests.HTTPError: pass
        j = out/"episodes.jsonl"
        kept = len(j.read_text().splitlines()) if j.exists() else 0
        if not kept: return "loss", f"HTTP error at call 31 of ~48: {calls[0] - 1} answered calls, episodes.jsonl {'empty' if j.exists() else 'not written'}"
        n1 = calls[0]; fail_at[0] = -1
        mage_memoryarena_endpoint(data, epochs=1, smoke=False, out_dir=out)
        return "ok", f"{kept} finished task runs journaled before the error; rerun made {calls[0] - n1} more calls (of ~48)"
    finally:
        requests.Session = old_sess
        for k, v in env0.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

# ================================================================================================================= data
def coco_fixture(name, edit):
    from xwlearn.vision.detection import write_coco_shapes
    root = write_coco_shapes(ROOT/name, n_train=4, n_val=2, size=64, seed=0)
    f = root/"annotations"/"instances_train2017.json"; js = json.loads(f.read_text()); edit(js, root); f.write_text(json.dumps(js))
    return root

def coco_load_all(root):
    "Build the train dataset and a loader, pull every item: (dataset, items)."
    from xwlearn.vision.detection import coco_dls
    dls = coco_dls(root, bs=2, size=None, max_size=None, device="cpu")
    ds = dls.train.dataset
    items = [ds[i] for i in range(len(ds))]
    for _ in dls.train: pass
    return ds, items

def coco_probe(name, edit, expect_refuse=False, words=("bbox", "drop", "images", "file_name", "category")):
    root = coco_fixture(name, edit)
    with caught() as w:
        try: ds, items = coco_load_all(root)
        except Exception as e:
            return ("ok" if clear(e, *words) else "crash"), msg(e), None
    ws = [str(x.message) for x in w if any(k in str(x.message).lower() for k in words)]
    return None, (ws[0][:160] if ws else ""), (ds, items)

@probe
def coco_image_without_annotations():
    def edit(js, root): js["annotations"] = [a for a in js["annotations"] if a["image_id"] != js["images"][0]["id"]]
    o, d, r = coco_probe("coco_noann", edit)
    if o: return ("crash" if o == "crash" else "silent"), "image without objects refused/crashed: " + d  # a valid image must load
    ds, items = r
    n0 = len(items[0][1]["boxes"]) if "boxes" in items[0][1] else "no 'boxes' key"
    return "ok", f"loaded {len(items)} images; the image without annotations has {n0} boxes"

@probe
def coco_json_without_images():
    def edit(js, root): del js["images"]
    o, d, r = coco_probe("coco_noimages", edit)
    if o: return o, d
    return "silent", f"json without 'images' loaded as {len(r[1])} images, no error"

@probe
def coco_empty_split():
    def edit(js, root): js["images"], js["annotations"] = [], []
    o, d, r = coco_probe("coco_empty", edit, words=("images", "empty", "nothing"))
    if o: return o, d
    return "silent", f"an empty split loaded as {len(r[1])} images, no error"

@probe
def coco_bad_boxes():
    def edit(js, root):
        iid = js["images"][0]["id"]; nid = max(a["id"] for a in js["annotations"]) + 1
        for k, b in enumerate(([-10, -10, 5, 5], [5, 5, -3, 4], [float("nan"), 3, 4, 4], [1000, 1000, 10, 10], [50, 50, 40, 40])):
            js["annotations"].append(dict(id=nid + k, image_id=iid, category_id=1, bbox=b, area=16, iscrowd=0))
    o, d, r = coco_probe("coco_badbox", edit)
    if o: return o, d
    ds, items = r
    nb = len(items[0][1]["boxes"])
    if d: return "ok", f"warned: {d}"
    return "silent", f"negative/NaN/out-of-image/overhanging boxes handled without a word (image 0 now has {nb} boxes)"

@probe
def coco_unknown_category():
    def edit(js, root):
        nid = max(a["id"] for a in js["annotations"]) + 1
        js["annotations"].append(dict(id=nid, image_id=js["images"][0]["id"], category_id=99, bbox=[2, 2, 10, 10], area=100, iscrowd=0))
    o, d, r = coco_probe("coco_cat", edit)
    if o: return o, d
    labels = sorted({int(l) for _, t in r[1] for l in t["labels"]})
    if d: return "ok", f"warned: {d}"
    return "silent", f"category_id 99 (not in 'categories') without a word; labels seen {labels}"

@probe
def coco_file_name_escapes_root():
    def edit(js, root):
        shutil.copy(root/"train2017"/js["images"][0]["file_name"], root/"escape.png")
        js["images"][0]["file_name"] = "../escape.png"
    o, d, r = coco_probe("coco_escape", edit, words=("file_name", "..", "escape"))
    if o: return o, d
    return "silent", f"file_name '../escape.png' loaded from outside the image folder ({len(r[1])} images)"

@probe
def cifar_float_pixels():
    from xwlearn.data import read_cifar10
    d = ROOT/"cifar_float"; shutil.copytree(CIFAR, d)
    x = _rng.random((20, 3072)).astype(np.float32)  # [0,1) floats
    with open(d/"cifar-10-batches-py"/"data_batch_1", "wb") as f:
        pickle.dump({b"data": x, b"labels": [int(v) for v in _rng.integers(0, 10, 20)], b"batch_label": b"b1"}, f, protocol=2)
    try: r = read_cifar10(d)
    except Exception as e: return ("ok" if clear(e, "data", "uint8", "float") else "crash"), msg(e)
    u = torch.unique(r["x"][:20]).tolist()
    return "silent", f"float [0,1) pixels read without a word as uint8 values {u[:5]}"

@probe
def cifar_meta_too_few_names():
    from xwlearn.data import read_cifar10
    d = ROOT/"cifar_names"
    write_cifar10_pickles(d, _rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), np.arange(24) % 10,
                          _rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 10, label_names=CIFAR10_CLASSES[:5])
    try: r = read_cifar10(d)
    except Exception as e: return ("ok" if clear(e, "label", "batches.meta", "classes") else "crash"), msg(e)
    return "silent", f"labels 0..9 with {len(r['classes'])} names in batches.meta accepted"

# =============================================================================================================== safety
@probe
def group_fisher_weights_pickle():
    from xwlearn.data import write_imagefolder
    from xwlearn.repro.group_fisher import group_fisher_imagenet_resnet50
    class Payload:
        def __init__(self, marker): self.marker = str(marker)
        def __reduce__(self): return (open, (self.marker, "w"))
    marker, evil = ROOT/"PWNED", ROOT/"evil.pth"
    torch.save({"w": Payload(marker)}, evil)
    ims, ys, names = make_shapes_classification(10, size=32, seed=0)
    for split in ("train", "val"): write_imagefolder(ROOT/"inet", ims, ys, names, split=split)
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"); os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        try: group_fisher_imagenet_resnet50(ROOT/"inet", epochs=1, smoke=True, weights=str(evil)); err = None
        except Exception as e: err = e
    finally:
        if old is None: os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        else: os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old
    if marker.exists(): return "loss", f"unpickling a weights= file ran its code (marker created); then {msg(err, 80) if err else 'no error'}"
    return ("ok" if err is not None else "silent"), f"payload refused: {msg(err, 120) if err else 'no error?'}"

@probe
def gguf_cache_key():
    import xwlearn.llm.core as lc
    old = os.environ.get("XWLEARN_CACHE"); os.environ["XWLEARN_CACHE"] = str(ROOT/"llmcache")
    try:
        fa, fb, fr = ROOT/"ga"/lc.SMOLLM2_FILE, ROOT/"gb"/lc.SMOLLM2_FILE, ROOT/"gr"/lc.SMOLLM2_FILE
        for f, data in ((fa, b"GGUF" + os.urandom(2000)), (fb, b"GGUF" + os.urandom(2000)), (fr, os.urandom(2000))):
            f.parent.mkdir(); f.write_bytes(data)
        ca, cb = lc._gguf_cache(fa), lc._gguf_cache(fb)
        same = ca == cb
        try: cr = lc._gguf_cache(fr); rnd = f"random bytes map to cache {cr.name} (not refused)"; rnd_ok = False
        except Exception as e: rnd, rnd_ok = "random bytes refused: " + msg(e, 90), clear(e, "gguf")
        if same:
            ca.mkdir(parents=True); (ca/"config.json").write_text("{}")
            served = lc._convert_gguf(fr if not rnd_ok else fb) == ca   # an existing cache answers for other bytes
            return "silent", f"two different files named {lc.SMOLLM2_FILE} share cache {ca.name}; served from it: {served}; {rnd}"
        return ("ok" if rnd_ok else "silent"), f"different bytes -> different caches ({ca.name} vs {cb.name}); {rnd}"
    finally:
        if old is None: os.environ.pop("XWLEARN_CACHE")
        else: os.environ["XWLEARN_CACHE"] = old

@probe
def bench_from_cwd():
    from xwlearn.cli import _find_bench
    d = ROOT/"foreign"; (d/"kernels").mkdir(parents=True)
    (d/"kernels"/"bench.py").write_text(f"open({str(ROOT/'BENCH_RAN')!r}, 'w').write('x')\n")
    cwd = os.getcwd(); os.chdir(d)
    try: b = _find_bench()
    finally: os.chdir(cwd)
    if b is not None and Path(b).resolve().is_relative_to(d.resolve()):
        return "loss", f"_find_bench() -> {b}: `xwlearn bench` would run the cwd's kernels/bench.py"
    return "ok", f"_find_bench() -> {b}"

def _qkv(dt):
    mk = lambda *s: (torch.randn(*s) * 3).to(dt) if dt != torch.bool else torch.randn(*s) > 0
    return mk(2, 2, 1, 4), mk(2, 3, 4), mk(2, 3, 4), mk(2, 2, 5, 4), mk(2, 2, 5, 4)

@probe
def relay_non_float_tensors():
    from xwlearn.llm.relay import relay_attention
    res = {}
    for dt in (torch.int64, torch.bool, torch.complex64):
        try: out = relay_attention(*_qkv(dt)); res[str(dt)] = ("silent", f"accepted -> {out.dtype}")
        except Exception as e: res[str(dt)] = ("ok" if clear(e, "q", "k_sys", "dtype") else "crash", msg(e, 70))
    return worst([o for o, _ in res.values()]), "; ".join(f"{k}: {o} ({d})" for k, (o, d) in res.items())

@probe
def relay_req_lens_out_of_range():
    from xwlearn.llm.relay import relay_attention
    res = {}
    for lens in ([7, 3], [-1, 3]):
        try: relay_attention(*_qkv(torch.float32), req_lens=torch.tensor(lens)); res[str(lens)] = ("silent", "accepted")
        except Exception as e: res[str(lens)] = ("ok" if clear(e, "req_lens") else "crash", msg(e, 70))
    return worst([o for o, _ in res.values()]), "L_req=5; " + "; ".join(f"req_lens={k}: {o} ({d})" for k, (o, d) in res.items())

def _adax_try(label, make, names):
    try: make(); return "silent", f"{label}: accepted"
    except Exception as e: return ("ok" if clear(e, *names) else "crash"), f"{label}: {msg(e, 80)}"

@probe
def adax_tensor_lr_negative():
    from xwlearn.optim.adax import AdaX
    p = nn.Parameter(torch.randn(3))
    return _adax_try("AdaX(lr=torch.tensor(-0.1))", lambda: AdaX([p], lr=torch.tensor(-0.1)), ["lr"])

@probe
def adax_inf_lr_eps():
    from xwlearn.optim.adax import AdaX
    p = nn.Parameter(torch.randn(3))
    r = [_adax_try("lr=inf", lambda: AdaX([p], lr=math.inf), ["lr"]), _adax_try("eps=inf", lambda: AdaX([p], eps=math.inf), ["eps"])]
    return worst([o for o, _ in r]), "; ".join(d for _, d in r)

@probe
def adax_adam_betas_warn():
    from xwlearn.optim.adax import AdaX
    p = nn.Parameter(torch.randn(3))
    with caught() as w: AdaX([p], betas=(0.9, 0.999))
    ws = [str(x.message) for x in w if "0.999" in str(x.message) or "β₂" in str(x.message) or "beta" in str(x.message).lower()]
    return ("ok" if ws else "silent"), (f"warned: {ws[0][:120]}" if ws else "betas=(0.9, 0.999) accepted without a warning")

@probe
def adax_complex_params():
    from xwlearn.optim.adax import AdaX
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    return _adax_try("AdaX([complex64 param])", lambda: AdaX([p]), ["complex", "params"])

@probe
def adax_load_adam_state():
    from xwlearn.optim.adax import AdaX
    p = nn.Parameter(torch.randn(3)); adam = torch.optim.Adam([p])
    p.grad = torch.randn(3); adam.step()
    q = nn.Parameter(torch.randn(3)); ax = AdaX([q])
    return _adax_try("AdaX.load_state_dict(Adam state)", lambda: ax.load_state_dict(adam.state_dict()), ["adam", "state"])

@probe
def kalman_autocast_bf16():
    from xwlearn.norm.kalman import BatchKalmanNorm2d, convert_bn_to_bkn
    torch.manual_seed(0)
    res = {}
    for label, mk in (("BatchKalmanNorm2d after a conv", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchKalmanNorm2d(4, group_size=2))),
                      ("convert_bn_to_bkn (linked)", lambda: convert_bn_to_bkn(nn.Sequential(
                          nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), group_size=2))):
        m = mk().train(); x = torch.randn(4, 3, 8, 8)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16): y = m(x)
            y.float().sum().backward()
            fin = bool(torch.isfinite(y.float()).all())
            res[label] = ("ok" if fin else "silent", f"ran, out {y.dtype}, finite={fin}")
        except Exception as e: res[label] = ("crash", msg(e, 90))
    return worst([o for o, _ in res.values()]), "; ".join(f"{k}: {o} ({d})" for k, (o, d) in res.items())

class _ChanOp(nn.Module):
    "Conv a (8 ch) read by conv b and by an op over the channel dim (topk / max)."
    def __init__(self, op):
        super().__init__(); self.op = op
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(10, 4)
    def forward(self, x):
        y = F.relu(self.a(x))
        t = y.topk(2, dim=1).values if self.op == "topk" else torch.cat([y.max(1, keepdim=True)[0], y.min(1, keepdim=True)[0]], 1)
        return self.head(torch.cat([F.relu(self.b(y)).mean((2, 3)), t.flatten(2).mean(2)], 1))

class _Chunk(nn.Module):
    "Conv a's output chunked in two (to convs b, c) and also read whole by conv d."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)
    def forward(self, x):
        y = F.relu(self.a(x)); p, q = y.chunk(2, dim=1)
        return self.head(F.adaptive_avg_pool2d(self.b(p) + self.c(q) + self.d(y), 1).flatten(1))

def _gf_prune_all(net):
    from xwlearn.prune.group_fisher import GroupFisher, prune_model
    torch.manual_seed(0); net.eval(); x = torch.randn(4, 3, 8, 8)
    with caught() as w:
        gf = GroupFisher(net, x)
        with torch.no_grad(): y_orig = net(x)
        n, half = 0, int(gf.prunable().sum()) // 2   # prune half of the prunable groups (a topk(2) keeps enough channels)
        for i in range(len(gf.groups)):
            if n < max(half, 1) and gf.prunable()[i]: gf.prune_group(i); n += 1
        with torch.no_grad(): y0 = net(x); y1 = prune_model(gf)(x)
    ws = [str(m.message) for m in w if "trace_groups" in str(m.message) or "does not understand" in str(m.message)]
    return n, float((y0 - y1).abs().max()), ws

@probe
def gf_topk_max_over_channels():
    res = {}
    for op in ("topk", "max"):
        try:
            torch.manual_seed(0); n, d, ws = _gf_prune_all(_ChanOp(op))
            if d > 1e-5: res[op] = ("silent", f"{n} groups pruned; pruned net differs from masked by {d:.3g}{'' if not ws else ' (warned)'}")
            else: res[op] = ("ok", f"{n} groups pruned, pruned == masked" + ("; warned" if ws else ""))
        except Exception as e: res[op] = ("crash", msg(e, 80))
    return worst([o for o, _ in res.values()]), "; ".join(f"{k}: {o} ({d})" for k, (o, d) in res.items())

@probe
def gf_chunk_with_other_consumer():
    try: n, d, ws = _gf_prune_all(_Chunk())
    except Exception as e: return "crash", "prune_model/forward failed: " + msg(e, 120)
    if d > 1e-5: return "silent", f"{n} groups pruned; pruned net differs from masked by {d:.3g}"
    return "ok", f"{n} groups pruned, pruned == masked" + (f"; warned: {ws[0][:80]}" if ws else "")

GF_NOTHING = r'''
import warnings, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
from xwlearn.prune.group_fisher import GroupFisher
class P(nn.Module):
    def __init__(self): super().__init__(); self.a = nn.Conv2d(3, 4, 3); self.head = nn.Linear(4, 2)
    def forward(self, x): return self.head(F.adaptive_avg_pool2d(self.a(x), 1).flatten(1))
torch.manual_seed(0)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    gf = GroupFisher(P(), torch.randn(2, 3, 8, 8))
    n = 0
    while gf.flops() > 0.1 * gf.flops0:      # prune to 10 % FLOPs: unreachable, conv a keeps one channel
        r = gf.step(); n += 1
        if r is None: print(f"STOPPED after {n} steps; alive groups {int(gf.alive.sum())}; counts {gf.counts()}"); break
        if n >= 20000: print(f"LOOPING: {n} steps and still pruning; alive groups {int(gf.alive.sum())}; counts {gf.counts()}"); break
print("WARNINGS:", [str(m.message)[:80] for m in w])
'''

@probe
def gf_nothing_prunable_terminates():
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    try: p = subprocess.run([sys.executable, "-c", GF_NOTHING], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired: return "crash", "hung for 60 s"
    out = (p.stdout + p.stderr).strip().splitlines()
    first = next((l for l in out if l.startswith(("STOPPED", "LOOPING"))), out[-1] if out else "")
    if first.startswith("STOPPED"): return "ok", first + " | " + next((l for l in out if l.startswith("WARNINGS")), "")[:100]
    if first.startswith("LOOPING"): return "crash", first
    return "crash", first[:160]

# ================================================================================================================= MAGE
@probe
def mage_validator_fail_variants():
    from xwlearn.agents.mage import MageMemory
    res = {}
    for reply in ("fail 0 | wrong item bought", "FAIL 0: wrong item bought"):
        m = MageMemory(threshold=0)
        m.reset("buy things", aux=lambda p, r=reply: r if p.startswith("### VALIDATE") else "bought a laptop")
        m.record("search laptop", "results P1 P2"); m.subgoal_done()
        res[reply] = ("ok" if m.n_fail == 1 else "silent", f"n_fail={m.n_fail}")
    return worst([o for o, _ in res.values()]), "; ".join(f"{k!r}: {o} ({d})" for k, (o, d) in res.items())

@probe
def mage_score_answer_negation():
    from xwlearn.repro.mage import score_answer
    r = score_answer("It is not 12, it is 15", "12")
    return ("silent" if r else "ok"), f"score_answer('It is not 12, it is 15', '12') = {r}"

@probe
def mage_parse_action_negation():
    from xwlearn.repro.mage import parse_action
    r = parse_action("I cannot submit yet; search laptop")
    return ("ok" if r == "search laptop" else "silent"), f"parse_action('I cannot submit yet; search laptop') = {r!r}"

@probe
def openai_full_endpoint_url():
    from xwlearn.llm.core import OpenAIChat
    u = "http://localhost:8000/v1/chat/completions"
    url = OpenAIChat(base_url=u, model="m", api_key="").url
    return ("ok" if url == u else "silent"), f"base_url={u} -> url {url}"

# ================================================================================================================== CLI
def cli_resume(out):
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    p = subprocess.run([sys.executable, "-m", "xwlearn", "train", "smoke_cifar10", "--data", str(CIFAR), "--out", str(out),
                        "--resume", "--epochs", "2", "--smoke", "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    err = [l for l in p.stderr.strip().splitlines() if l.strip()]
    return p.returncode, (err[-1] if err else ""), len(err)

@probe
def cli_checkpoint_missing_key():
    out = ROOT/"cli_rng"; unfinished_run(out)
    ck = torch.load(out/"last.pth", weights_only=True); del ck["rng"]; torch.save(ck, out/"last.pth")
    rc, last, n = cli_resume(out)
    if rc == 0: return "silent", "resumed from a checkpoint without 'rng'"
    ok = "last.pth" in last and "rng" in last and "Traceback" not in last
    return ("ok" if ok else "crash"), f"rc={rc}, stderr ({n} lines) ends: {last[:150]!r}"

@probe
def cli_checkpoint_truncated():
    out = ROOT/"cli_trunc"; unfinished_run(out)
    f = out/"last.pth"; data = f.read_bytes(); f.write_bytes(data[:len(data) // 2])
    rc, last, n = cli_resume(out)
    if rc == 0: return "silent", "resumed from a truncated checkpoint"
    ok = "last.pth" in last and n <= 3
    return ("ok" if ok else "crash"), f"rc={rc}, stderr ({n} lines) ends: {last[:150]!r}"

# ================================================================================================================== run
def main():
    t0 = time.time()
    only = sys.argv[1:]
    for fn in PROBES:
        if only and fn.__name__ not in only: continue
        t = time.time()
        try: o, d = fn()
        except Exception as e:
            o, d = "crash", "probe raised " + msg(e, 200)
            tb = traceback.format_exc().strip().splitlines()
            d += " @ " + " | ".join(l.strip() for l in tb[-4:-1])[:200]
        RESULTS.append((fn.__name__, o, d))
        print(f"{fn.__name__:<34} {TAG}-{o:<7} {d}  [{time.time() - t:.1f}s]", flush=True)
    counts = {k: sum(o == k for _, o, _ in RESULTS) for k in ("ok", "silent", "loss", "crash", "skipped")}
    print(f"\n{TAG} counts ({len(RESULTS)} probes): " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"  [{time.time() - t0:.0f}s]")
    shutil.rmtree(ROOT, ignore_errors=True)

if __name__ == "__main__": main()
