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
print("xwlearn.distributed:", names_extra(_dist, "dist"))
from xwlearn.core import require
for mod, extra in [("accelerate", "dist"), ("transformers", "llm"), ("pycocotools", "detection")]:
    try: importlib.import_module(mod); print(f"note: {mod} is installed here (pulled in by a base dependency)")
    except ImportError: print(f"{mod} missing:", names_extra(lambda: require(mod, extra=extra), extra))
if "xwlearn.llm.core" in sys.modules or importlib.util.find_spec("xwlearn.llm.core"):
    import xwlearn.llm.core as llm
    print("xwlearn.llm.core imported without the llm extra")

r = subprocess.run([sys.executable, "-m", "xwlearn", "list"], capture_output=True, text=True)
assert r.returncode == 0, r.stderr[-2000:]
print("xwlearn list: ok,", len(r.stdout.splitlines()), "lines")
print("check-wheel: OK")
