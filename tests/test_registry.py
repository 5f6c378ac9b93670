"""Registry-wide checks: the paper table, reproductions and recipes."""
import json
from pathlib import Path
import nbformat
import pytest
from xwlearn.core import PAPERS, papers_markdown, get_reproduction, REPRODUCTIONS, VERDICTS, RECIPES, get_recipe

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
    "A paper key finds its reproduction and recipes without `reproduce all`: the registry imports the paper's modules by name."
    import subprocess, sys
    code = ("from xwlearn.core import get_reproduction as g, get_recipe, PAPERS\n"
            "r = g('kalman'); print(r.key, r.paper, get_recipe('adax_cifar10_resnet20').paper)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["kalman", "kalman", "adax"], r.stdout

@pytest.mark.parametrize("key", sorted(k for k, p in PAPERS.items() if p.implemented()))
def test_layout_of_an_implemented_paper(key):
    """Paper notebook -> method module, companion notebook -> `xwlearn.repro.<key>`, reproduction key = paper key,
    recipe names `<paper_key>_<dataset>_<model>`, and the two notebooks link to each other."""
    p = PAPERS[key]
    p.load()
    assert key in REPRODUCTIONS and REPRODUCTIONS[key].paper == key
    for name, r in RECIPES.items():
        if r.paper != key: continue
        assert name.startswith(f"{key}_{r.dataset}_") and len(name) > len(f"{key}_{r.dataset}_"), \
            f"recipe {name!r} of {key}: expected <paper_key>_<dataset>_<model> = {key}_{r.dataset}_<model>"
        assert r.fn.__module__ == p.repro_module, f"recipe {name!r} is defined in {r.fn.__module__}, not {p.repro_module}"
    assert REPRODUCTIONS[key].fn.__module__ == p.repro_module
    paper_nb, comp_nb = ROOT/"nbs"/p.notebook, ROOT/"nbs"/p.companion
    assert Path(comp_nb.name) != Path(paper_nb.name)
    paper_txt, comp_txt = paper_nb.read_text(), comp_nb.read_text()
    assert comp_nb.name in paper_txt, f"{p.notebook} does not link its companion {comp_nb.name}"
    assert paper_nb.name in comp_txt, f"{p.companion} does not link back to {paper_nb.name}"
