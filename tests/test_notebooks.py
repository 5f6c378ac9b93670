"""One pytest case per notebook: each runs top to bottom with nbdev's own test runner (`nbdev.test.test_nb`).

Cells flagged with a `tst_flags` directive (`#| slow`, `#| cuda`) are skipped unless listed in the environment
variable `XWLEARN_NB_FLAGS` (e.g. `XWLEARN_NB_FLAGS="slow"`), the same way `nbdev-test --flags slow` works.
"""
import os, re
from pathlib import Path
import pytest
import nbdev.test as nbtest
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parents[1]
cfg = get_config(ROOT)
NBS = Path(cfg.nbs_path)

def _notebooks():
    "Every notebook nbdev would test: skip files/folders starting with `_` or `.` and folders holding a `.notest` file."
    out = []
    for nb in sorted(NBS.rglob("*.ipynb")):
        rel = nb.relative_to(NBS)
        if any(part.startswith(("_", ".")) for part in rel.parts): continue
        if any((p/".notest").exists() for p in nb.parents if NBS in p.parents or p == NBS): continue
        out.append(nb)
    return out

FLAGS = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
FORCE = os.environ.get("XWLEARN_NB_FLAGS", "").split()

@pytest.fixture
def registries_restored():
    "A notebook runs its `@recipe`/`@reproduction` cells in `__main__` of this worker: put the registries back afterwards."
    from xwlearn import core
    saved = {n: dict(getattr(core, n)) for n in ("RECIPES", "REPRODUCTIONS")}
    yield
    for n, d in saved.items():
        reg = getattr(core, n)  # keep what modules imported during the run registered; drop what the notebook's own cells did
        imported = {k: v for k, v in reg.items() if k not in d and getattr(v.fn, "__module__", "") != "__main__"}
        reg.clear(); reg.update(d); reg.update(imported)

@pytest.mark.parametrize("nb", _notebooks(), ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(nb, registries_restored):
    ok, secs = nbtest.test_nb(nb, skip_flags=[f for f in FLAGS if f not in FORCE], force_flags=FORCE,
                              basepath=cfg.config_path)
    print(f"{nb.relative_to(NBS)}: {secs:.1f} s")
    assert ok, f"notebook {nb.relative_to(NBS)} failed (its traceback is printed above on stderr)"

def test_found_notebooks():
    nbs = [str(p.relative_to(NBS)) for p in _notebooks()]
    assert "index.ipynb" in nbs and "00_core/00_core.ipynb" in nbs, nbs

def _import_line(l):
    return re.match(r"\s*(import \S|from \S+ import )", l) is not None

@pytest.mark.parametrize("nb", _notebooks(), ids=lambda p: str(p.relative_to(NBS)))
def test_imports_in_cells_of_their_own(nb):
    """nbdev's docs processing executes every cell that contains an import (plus exported cells): a cell that mixes an
    import with other code then runs out of context and breaks the docs build. Keep imports in cells of their own."""
    import nbformat
    bad = []
    for i, c in enumerate(nbformat.read(nb, as_version=4).cells):
        if c.cell_type != "code" or re.search(r"^#\|\s*export", c.source, re.M) or "nbdev_export(" in c.source: continue
        stmts = [s.strip() for l in c.source.splitlines() if l.strip() and not l.strip().startswith("#")
                 for s in l.split(";") if s.strip()]
        if any(_import_line(s) for s in stmts) and not all(_import_line(s) for s in stmts): bad.append(i)
    assert not bad, f"{nb.relative_to(NBS)}: cells {bad} mix imports with other code"
