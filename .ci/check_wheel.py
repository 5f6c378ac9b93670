"Run from outside the source tree, in a venv holding only `pip install xwlearn` (no extras)."
import importlib, subprocess, sys, time
import xwlearn
from pathlib import Path
assert "site-packages" in xwlearn.__file__, f"not the installed wheel: {xwlearn.__file__}"
from xwlearn.core import PAPERS

t0 = time.time(); n = 0
for k, p in PAPERS.items():
    if not p.implemented(): continue
    for m in p.modules:
        importlib.import_module(m); n += 1
print(f"imported {n} method modules in {time.time() - t0:.1f} s")

import timm, xwlearn.models  # registers every xw_* model
names = timm.list_models("xw_*")
assert names, "no xw_* model registered"
for name in names:
    m = timm.create_model(name, num_classes=10)
    assert sum(p.numel() for p in m.parameters()) > 0
print(f"created {len(names)} xw_* models: {', '.join(names)}")

# what needs an extra fails with a message naming it
def names_extra(fn, extra):
    try: fn()
    except ImportError as e:
        assert f'xwlearn[{extra}]' in str(e), f"error does not name the extra {extra!r}: {e}"
        return str(e)
    raise AssertionError(f"expected an ImportError naming xwlearn[{extra}]")

def _dist(): import xwlearn.distributed
print("import xwlearn.distributed:", names_extra(_dist, "dist"))
import xwlearn.llm.core as llm  # imports with torch alone; loading a model needs the llm extra
Path("hf_model").mkdir(exist_ok=True); Path("hf_model/config.json").write_text("{}")
print("xwlearn.llm.core.load_causal_lm:", names_extra(lambda: llm.load_causal_lm("hf_model"), "llm"))
from xwlearn.vision.evaluation import coco_evaluate  # COCO AP against pycocotools / faster-coco-eval: the detection extra
gt = dict(images=[dict(id=1, width=8, height=8)], annotations=[], categories=[dict(id=1, name="a")])
print("xwlearn.vision.evaluation.coco_evaluate:", names_extra(lambda: coco_evaluate(gt, []), "detection"))
from xwlearn.vision.datasets import write_fixture  # MegaDepth's depth maps are HDF5: the matching extra
print("xwlearn.vision.datasets.write_fixture('megadepth'):", names_extra(lambda: write_fixture("megadepth", Path("md_fixture")), "matching"))

r = subprocess.run([sys.executable, "-m", "xwlearn", "list"], capture_output=True, text=True)
assert r.returncode == 0, r.stderr[-2000:]
print("xwlearn list: ok,", len(r.stdout.splitlines()), "lines")
print("check-wheel: OK")
