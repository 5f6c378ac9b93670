"""The house's layers, checked from the import graph (`ast`) and in fresh interpreters.

From the ground up (STYLE.md, Layout): `xwlearn.core` imports no xwlearn module; the substrate (an explicit list below)
imports core and substrate only; a paper's method module imports core and the substrate's light parts — no other paper,
no reproduction module, no recipes, no CLI, and no kernel at module level (a method takes a kernel lazily, or as a
callable); a reproduction module `xwlearn.repro.<paper_key>` imports its own paper, core and the substrate; kernels
import core at most at module level (a paper's or the substrate's PyTorch reference, their oracle, only inside functions); the CLI and
the docs builder find papers through the registry, by module name. Paper and reproduction modules are classified from
`PAPERS`; every other module must be listed here, so a new module fails this test until someone classifies it.
"""
import ast, json, subprocess, sys
from pathlib import Path
import pytest
from xwlearn.core import PAPERS

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT/"xwlearn"

CORE = {"xwlearn.core"}
SUBSTRATE = {"xwlearn.data", "xwlearn.nets", "xwlearn.distributed", "xwlearn.recipes", "xwlearn.repro.kit",
             "xwlearn.vision.detection", "xwlearn.llm.core",
             # the vision substrate (issues 19-21): light pieces (torch/torchvision/scipy/numpy) and the fastai side
             "xwlearn.vision.evaluation", "xwlearn.vision.scenes", "xwlearn.vision.formats", "xwlearn.vision.datasets",
             "xwlearn.vision.transforms", "xwlearn.vision.layers", "xwlearn.vision.detr", "xwlearn.vision.learner",
             "xwlearn.vision.semi",
             # the vision-language substrate (issue 29): tiny CLIP / DINO-lite and the loaders of real weights
             "xwlearn.vl.clip", "xwlearn.vl.dino",
             # issues 25, 28, 30: the DINO detector, the grounding text encoder and data, open-vocabulary evaluation
             "xwlearn.vision.dino_detr", "xwlearn.vl.text", "xwlearn.vl.grounding", "xwlearn.vl.openvocab"}
TOP = {"xwlearn.cli", "xwlearn.__main__", "xwlearn.docs", "xwlearn.report"}
META = {"xwlearn", "xwlearn._modidx"}           # the package itself (version, docstring) and nbdev's symbol index
REGISTRIES = {"xwlearn.models": "xwlearn.models."}  # timm-style: `import xwlearn.models` registers every backbone
# substrate pieces a method module may NOT import (training loop, reproduction kit, accelerate-only code)
HEAVY_SUBSTRATE = {"xwlearn.recipes", "xwlearn.repro.kit", "xwlearn.distributed", "xwlearn.vision.learner",
                   "xwlearn.vision.detection"}

def module_name(path:Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    return ".".join(parts)

def modules(lib:Path=LIB) -> dict:
    "{module name: path} of every python file of the library."
    return {module_name(p): p for p in sorted(lib.rglob("*.py")) if "__pycache__" not in p.parts}

def xw_imports(path:Path, name:str) -> list:
    "[(imported xwlearn module, lazy?)] of one file; relative imports resolved; `from pkg import mod` counts as `pkg.mod`."
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    def add(m, node):
        if m == "xwlearn" or m.startswith("xwlearn."): out.append((m, id(node) not in top))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names: add(a.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else: mod = node.module or ""
            for a in node.names:  # `from xwlearn.models import biformer` imports the module xwlearn.models.biformer
                sub = f"{mod}.{a.name}"
                add(sub if (LIB.parent/Path(*sub.split("."))).with_suffix(".py").exists() else mod, node)
    return list(dict.fromkeys(out))

def classify(mods:dict) -> dict:
    papers = {}                                          # module -> the keys it serves (one notebook may hold two papers)
    for k, p in PAPERS.items():
        for m in p.modules: papers.setdefault(m, set()).add(k)
    repros = {p.repro_module: k for k, p in PAPERS.items()}
    kinds = {}
    for m, path in mods.items():
        if m in CORE: kinds[m] = ("core", None)
        elif m in SUBSTRATE: kinds[m] = ("substrate", None)
        elif m in TOP: kinds[m] = ("top", None)
        elif m in META: kinds[m] = ("meta", None)
        elif m in REGISTRIES: kinds[m] = ("registry", None)
        elif m in papers: kinds[m] = ("paper", papers[m])
        elif m in repros: kinds[m] = ("repro", {repros[m]})
        elif m.startswith("xwlearn.kernels."): kinds[m] = ("kernel", None)
        elif path.name == "__init__.py" and not xw_imports(path, m): kinds[m] = ("package", None)  # an empty package marker
        else: kinds[m] = ("unclassified", None)
    return kinds

def violations(lib:Path=LIB) -> list:
    "Every import that crosses the layers the wrong way, as readable lines."
    mods = modules(lib); kinds = classify(mods); bad = []
    for m, path in mods.items():
        kind, paper = kinds[m]
        if kind == "unclassified":
            bad.append(f"{m}: not classified — add it to SUBSTRATE/TOP in tests/test_layers.py or to PAPERS"); continue
        for imp, lazy in xw_imports(path, m):
            if imp == m: continue
            ik, ipaper = kinds.get(imp, ("missing", None))
            why = None
            if ik == "missing": why = "no such module"
            elif kind == "core": why = "core imports no xwlearn module"
            elif kind == "substrate" and ik in ("paper", "repro", "top", "registry"): why = "the substrate imports no paper, reproduction or CLI"
            elif kind == "paper":
                if ik == "paper" and not (ipaper & paper): why = "a paper imports no other paper"
                elif ik in ("repro", "top", "registry"): why = "a method module imports no reproduction, CLI or registry"
                elif imp in HEAVY_SUBSTRATE: why = "a method module imports no recipes, repro kit or distributed code"
                elif ik == "kernel" and not lazy: why = "a method module takes a kernel lazily (inside a function), not at import"
            elif kind == "repro":
                if ik == "paper" and not (ipaper & paper): why = "a reproduction imports only its own paper"
                elif ik in ("repro", "top") and imp != "xwlearn.repro.kit": why = "a reproduction imports no other reproduction or CLI"
            elif kind == "kernel":
                if ik not in ("core", "kernel", "meta") and not (ik in ("paper", "substrate") and lazy):
                    why = "kernels import torch/triton (a paper's or the substrate's reference only lazily, as the oracle)"
            elif kind == "registry":
                if not (ik == "paper" and imp.startswith(REGISTRIES[m])): why = f"a registry imports only the papers under {REGISTRIES[m]}"
            elif kind == "top":
                if ik in ("paper", "repro"): why = "the CLI/docs find papers through the registry, by module name"
            elif kind == "package": pass
            if why: bad.append(f"{m} imports {imp}{' (lazily)' if lazy else ''}: {why}")
    return bad

def test_layers():
    bad = violations()
    assert not bad, "imports across the layers:\n" + "\n".join(bad)

def test_every_paper_and_reproduction_module_is_where_the_registry_says():
    mods = modules()
    for k, p in PAPERS.items():
        if not p.implemented(): continue
        assert p.repro_module in mods, f"{k}: no reproduction module {p.repro_module} (companion notebook nbs/{p.companion})"
        assert (ROOT/"nbs"/p.notebook).exists() and (ROOT/"nbs"/p.companion).exists(), (p.notebook, p.companion)

def test_the_rule_catches_crossings(tmp_path):
    "The checker itself: a paper that imports another paper and the recipes, and an unclassified module, are reported."
    lib = tmp_path/"xwlearn"
    for f, src in {"__init__.py": "", "core.py": "import os\n", "recipes.py": "from .core import x\n",
                   "optim/__init__.py": "", "optim/adax.py": "from ..recipes import recipe\nfrom xwlearn.norm.kalman import k\n",
                   "norm/__init__.py": "", "norm/kalman.py": "from xwlearn.core import set_seed\n",
                   "mystery.py": "import xwlearn.core\n"}.items():
        (lib/f).parent.mkdir(parents=True, exist_ok=True); (lib/f).write_text(src)
    global ROOT, LIB
    old = ROOT, LIB
    ROOT, LIB = tmp_path, lib
    try: bad = violations(lib)
    finally: ROOT, LIB = old
    assert any("xwlearn.optim.adax imports xwlearn.norm.kalman: a paper imports no other paper" in b for b in bad), bad
    assert any("xwlearn.optim.adax imports xwlearn.recipes" in b for b in bad), bad
    assert any(b.startswith("xwlearn.mystery: not classified") for b in bad), bad
    assert not any(b.startswith("xwlearn.norm.kalman") for b in bad), bad

# --- light imports, in fresh interpreters ------------------------------------------------------------------
METHOD_MODULES = sorted({m for p in PAPERS.values() if p.implemented() for m in p.modules})
FORBIDDEN = ("fastai.learner", "xwlearn.recipes", "xwlearn.repro", "xwlearn.distributed", "xwlearn.data", "accelerate",
             "transformers", "sentence_transformers", "pycocotools")
PROBE = """import sys, json
import {m}
mods = set(sys.modules)
bad = sorted(f for f in {forbidden!r} if any(x == f or x.startswith(f + '.') for x in mods))
# fastai's own core (fastai.torch_core, which fastai.optimizer and fastai.callback.core import) loads matplotlib.pyplot;
# a module that does not import fastai must not load matplotlib at all
if 'fastai' not in mods and 'matplotlib' in mods: bad.append('matplotlib')
print(json.dumps(dict(n=len(mods), bad=bad, fastai='fastai' in mods)))
"""

@pytest.mark.parametrize("mod", METHOD_MODULES)
def test_method_module_imports_light(mod):
    r = subprocess.run([sys.executable, "-c", PROBE.format(m=mod, forbidden=FORBIDDEN)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{mod}: {res['n']} modules after import (fastai loaded: {res['fastai']})")
    assert not res["bad"], f"import {mod} loads {res['bad']}"
    src = modules()[mod].read_text()
    assert "import matplotlib" not in src and "from matplotlib" not in src, f"{mod} imports matplotlib"

def test_models_package_registers_every_model():
    "`import xwlearn.models` registers every xw_* model in timm (as timm/models/__init__.py does); `import xwlearn` stays light."
    code = ("import sys, xwlearn; light = 'torch' not in sys.modules\n"
            "import timm, xwlearn.models\n"
            "print(light, sorted(timm.list_models('xw_*')))\n"
            "timm.create_model('xw_biformer_small', num_classes=3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    light, names = r.stdout.split(" ", 1)
    assert light == "True", "import xwlearn imported torch"
    assert "xw_biformer_small" in names and "xw_glnet_4g" in names, names
