"The offline docs build (xwlearn.docs): a page per notebook, every `_modidx` anchor on its page, README in sync."
import ast, json, os, re, subprocess, sys
from pathlib import Path
import pytest
from nbdev.config import nbpath2html
from nbdev.processors import FilterDefaults

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

def _notebooks():
    return [p.relative_to(NBS) for p in sorted(NBS.rglob('*.ipynb'))
            if not any(o.startswith(('_', '.')) for o in p.relative_to(NBS).parts)]

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Build the site once (offline renderer) into a temporary folder"
    from xwlearn.docs import build_docs
    out, cwd = tmp_path_factory.mktemp('site')/'_docs', os.getcwd()
    os.chdir(ROOT)
    try: pages = build_docs(out=str(out), engine='offline')
    finally: os.chdir(cwd)
    return out, pages

def test_page_per_notebook(site):
    out, pages = site
    for rel in _notebooks():
        page = out/rel.parent/nbpath2html(rel).name
        assert page.exists(), f'no page {page} for nbs/{rel}'
    assert (out/'index.html').exists() and (out/'docs.css').exists()

def test_modidx_anchors(site):
    "Every symbol nbdev's index links to has its anchor (`id=...`) on the page the link names"
    out, _ = site
    txt = (ROOT/'xwlearn'/'_modidx.py').read_text()
    syms = ast.literal_eval(txt[txt.index('d = ')+4:])['syms']
    assert syms, '_modidx.py lists no symbols'
    missing = []
    for mod in syms.values():
        for sym, (url, _) in mod.items():
            page, _, anchor = url.partition('#')
            html = (out/page).read_text() if (out/page).exists() else ''
            if f'id="{anchor}"' not in html: missing.append(f'{sym} -> {url}')
    assert not missing, 'anchors missing from the docs:\n' + '\n'.join(missing)

def test_page_chrome(site):
    "Sidebar links every page from every page; MathJax, CSS and the show_doc headings are there"
    out, pages = site
    html = (out/'00_core'/'docs.html').read_text()
    assert 'mathjax' in html and 'href="../docs.css"' in html and '<nav id="sidebar">' in html
    assert '<h3 id="build_docs">' in html and '<nav id="TOC">' in html and '<h2 id="command-line">' in html
    for p in pages:
        rel = p.relative_to(out).as_posix()
        if rel != 'index.html': assert f'href="../{rel}"' in html, f'{rel} missing from the sidebar'
    assert '<span class="co">#|' not in html, 'a cell option leaked into a code block'

def test_failing_notebook_is_named(tmp_path):
    "A notebook that fails docs processing gives an error naming it"
    from xwlearn.docs import _proc_one, DocsError
    cell = lambda s: {'cell_type': 'code', 'metadata': {}, 'source': s, 'outputs': [], 'execution_count': None, 'id': 'c'+str(len(s))}
    nb = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': [
        {'cell_type': 'markdown', 'metadata': {}, 'source': '# Broken\n\n> fails', 'id': 'm'},
        cell('#| export\ndef f(): "doc"'), cell('import not_a_module_xyz')]}
    src = tmp_path/'05_broken.ipynb'; src.write_text(json.dumps(nb))
    cwd = os.getcwd(); os.chdir(ROOT)
    try:
        with pytest.raises(DocsError, match=r'05_broken\.ipynb(.|\n)*not_a_module_xyz'):
            _proc_one((src, tmp_path/'out.ipynb', FilterDefaults))
    finally: os.chdir(cwd)

@pytest.mark.skipif(not (NBS/'index.ipynb').exists(), reason='nbs/index.ipynb not written yet')
def test_readme_in_sync():
    "README.md is what nbs/index.ipynb generates (`python -m xwlearn.docs --readme-only` rewrites it)"
    r = subprocess.run([sys.executable, '-m', 'xwlearn.docs', '--check-readme'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'up to date' in r.stdout
