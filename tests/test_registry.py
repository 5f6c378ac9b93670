"""Registry-wide checks: the paper table, reproductions and recipes."""
import json
from pathlib import Path
import nbformat
import pytest
from xwlearn.core import PAPERS, papers_markdown, get_reproduction, REPRODUCTIONS, VERDICTS
from xwlearn.recipes import RECIPES, get_recipe

ROOT = Path(__file__).resolve().parents[1]

def test_index_table_is_generated_from_the_registry():
    "The table stored in nbs/index.ipynb (and so the README) equals what the registry generates now."
    nb = nbformat.read(ROOT/"nbs/index.ipynb", as_version=4)
    stored = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "text/markdown" in o.get("data", {})]
    assert stored, "index.ipynb has no stored table output: run `nbdev-test nbs/index.ipynb --save`"
    assert "".join(stored[0]).strip() == papers_markdown().strip(), \
        "the paper table in nbs/index.ipynb is stale: re-run it (`nbdev-test nbs/index.ipynb --save`, nbdev-clean, make readme)"

def test_every_paper_has_a_notebook_or_is_planned():
    for p in PAPERS.values():
        nb = ROOT/"nbs"/p.notebook
        if p.implemented(): assert nb.exists(), f"{p.key}: module exists but notebook {nb} does not"
        else: assert p.status == "planned"

@pytest.mark.parametrize("key", sorted(k for k, p in PAPERS.items() if p.implemented()))
def test_implemented_papers_register_reproduction_and_recipe(key):
    PAPERS[key].load()
    assert any(r.paper == key for r in REPRODUCTIONS.values()), f"{key}: no @reproduction registered"
    assert any(r.paper == key for r in RECIPES.values()), f"{key}: no @recipe registered"

def test_recipes_are_complete():
    for p in PAPERS.values():
        if p.implemented(): p.load()
    for name, r in RECIPES.items():
        assert r.epochs >= 1 and r.dataset and r.description, name
        assert (ROOT/"datasets"/f"{r.dataset}.md").exists(), f"recipe {name}: no dataset card datasets/{r.dataset}.md"

def test_reproduction_lookup_in_a_fresh_process():
    "A reproduction key that is not a paper key (and a paper key with one reproduction) resolve without `reproduce all`."
    import subprocess, sys
    code = ("from xwlearn.core import get_reproduction as g, PAPERS\n"
            "ks = [k for k, p in PAPERS.items() if p.implemented()]\n"
            "print(g('batch_kalman_norm').paper if 'kalman' in ks else 'kalman', g('kalman').key if 'kalman' in ks else 'batch_kalman_norm')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["kalman", "batch_kalman_norm"], r.stdout
