"The offline docs build (xwlearn.docs): a page per notebook, every `_modidx` anchor on its page, README in sync."
import ast, json, os, re, shutil, subprocess, sys, tempfile, warnings
from html import escape, unescape
from pathlib import Path
import pytest
from nbdev.config import nbpath2html
from nbdev.processors import FilterDefaults

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
ADAX_NB = Path('20_optimization/01_optim.adax.ipynb')
ADAX = (ADAX_NB.parent/nbpath2html(ADAX_NB).name).as_posix()  # the AdaX page, where the derivation is

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
    "Sidebar links every page from every page; CSS and the show_doc headings are there; no script (MathJax) is loaded"
    out, pages = site
    html = (out/'00_core'/'docs.html').read_text()
    assert '<script' not in html and 'href="../docs.css"' in html and '<nav id="sidebar">' in html
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

# ---- math renders offline: MathML (pandoc) or SVG (nbconvert), no CDN, no TeX left for a script to typeset ----
CDN = re.compile(r'(?:https?:)?//[^\s"\'<>()]*(?:mathjax|jsdelivr|cdnjs|unpkg|googleapis|gstatic)', re.I)
REMOTE = re.compile(r'<(?:script|img|iframe|source|video|audio|embed)\b[^>]*\ssrc\s*=\s*["\']?(?:https?:)?//'
                    r'|<link\b[^>]*\shref\s*=\s*["\']?(?:https?:)?//|@import\s+(?:url\()?\s*["\']?(?:https?:)?//'
                    r'|url\(\s*["\']?(?:https?:)?//', re.I)
# TeX delimiters \( \) \[ \] $$, inline $...$ (pandoc's rule: no space inside the dollars, no digit after), \commands
TEX = re.compile(r'\\[()\[\]]|\$\$|\$[^\s$](?:[^$\n]*?[^\s\\$])?\$(?!\d)|\\[A-Za-z]{2,}')

def _prose(html:str):
    "The text a reader sees, outside code (`<pre>`, `<code>`) and typeset math (`<math>`, `<svg>`); scripts and styles go"
    t = re.sub(r'<(pre|code|math|svg|script|style)\b.*?</\1\s*>', ' ', html, flags=re.S | re.I)
    return unescape(re.sub(r'<[^>]+>', ' ', t))

def _offline_problems(html:str):
    "What keeps `html` from showing its math without network: CDN URLs, remote scripts/styles/images, unrendered TeX"
    t = _prose(html)
    return ([f'CDN URL {m[0]}' for m in CDN.finditer(html)] + [f'remote resource {m[0]}' for m in REMOTE.finditer(html)]
            + [f'unrendered TeX {m[0]!r} in "...{t[max(0, m.start()-40):m.end()+40]}..."' for m in TEX.finditer(t)])

def test_offline_checker():
    "The checker flags what the MathJax build left offline, and passes code, typeset math and a price"
    assert _offline_problems('<p><span class="math inline">\\(\\hat v_t\\)</span></p>')
    assert _offline_problems('<p>$$x$$</p>') and _offline_problems('<p>with $x^2$ here</p>')
    assert _offline_problems('<p>\\frac{a}{b}</p>') and _offline_problems('<script src="https://cdn.jsdelivr.net/npm/x.js"></script>')
    assert _offline_problems('<link rel="stylesheet" href="https://example.com/a.css">')
    assert not _offline_problems('<pre><code>x = "$a$" + r"\\(b\\)"</code></pre><p>costs $5 and $10; <code>\\[</code> '
                                 '<math><semantics><mi>x</mi><annotation encoding="application/x-tex">\\hat x</annotation>'
                                 '</semantics></math> <a href="https://github.com/x/y">repo</a></p>')

def test_math_renders_offline(site):
    "Every page renders its math without network: no CDN, no remote resource, no TeX left; AdaX's formulas are MathML"
    out, _ = site
    pages = sorted(out.rglob('*.html'))
    assert len(pages) >= len(_notebooks())
    problems = {p.relative_to(out).as_posix(): pr[:5] for p in pages if (pr := _offline_problems(p.read_text()))}
    assert not problems, 'pages that need network or show raw TeX:\n' + '\n'.join(f'{k}: {v}' for k, v in problems.items())
    adax = (out/ADAX).read_text()
    assert adax.count('<math') >= 150 and adax.count('<math display="block"') >= 5, adax.count('<math')

def test_math_renders_offline_without_pandoc(site, monkeypatch, tmp_path):
    "The nbconvert engine (no pandoc) draws the formulas as SVG: the AdaX page, then every formula of the site"
    import xwlearn.docs as docs
    out, _ = site
    monkeypatch.setattr(docs, 'pandoc_path', lambda: None)
    page, title, nb, fm = docs.read_pages(ROOT/'_proc')[ADAX_NB.as_posix()]
    with warnings.catch_warnings():
        warnings.filterwarnings('error', 'mathtext cannot draw')  # a formula shown as its TeX source fails the test
        html = docs.render_page(page, title, nb, fm, tmp_path, [], 'xwlearn').read_text()
        assert not _offline_problems(html), _offline_problems(html)[:5]
        assert html.count('<span class="math inline"><svg') >= 150 and '<span class="math display"><svg' in html
        assert '<math' not in html and 'math-tex' not in html
        # every formula of the pandoc-built site (its TeX is kept in MathML's annotation) is one mathtext can draw
        texs = {unescape(t) for p in out.rglob('*.html')
                for t in re.findall(r'<annotation encoding="application/x-tex">(.*?)</annotation>', p.read_text(), flags=re.S)}
        assert len(texs) > 300
        for t in sorted(texs): assert docs.tex_html(t).count('<svg') >= 1, t

CHROMIUM = next((c for c in ('/usr/bin/chromium', shutil.which('chromium'), shutil.which('chromium-browser'),
                             shutil.which('google-chrome')) if c and Path(c).exists()), None)

def _screenshot(page:Path, png:Path, size:str='1200,2000'):
    "Headless Chromium's screenshot of `page` (no network, fresh profile), as a boolean ink mask"
    import numpy as np
    from PIL import Image
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                            '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={prof}',
                            f'--screenshot={png}', f'--window-size={size}', page.as_uri()],
                           capture_output=True, text=True, timeout=180)
    assert png.exists(), f'chromium wrote no screenshot (exit {r.returncode}):\n{r.stderr[-2000:]}'
    return np.asarray(Image.open(png).convert('L')) < 128

def _ink_box(ink):
    "(width, height) of the inked pixels"
    import numpy as np
    ys, xs = np.nonzero(ink)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)

def _as_raw_tex(html:str):
    "`html` with each MathML formula replaced by its TeX source in `\\(...\\)`/`\\[...\\]`: the MathJax page, offline"
    def _tex(m): return escape(('\\[{}\\]' if 'display="block"' in m[1] else '\\({}\\)').format(unescape(m[2])))
    return re.sub(r'<math([^>]*)>.*?<annotation encoding="application/x-tex">(.*?)</annotation>.*?</math>', _tex, html, flags=re.S)

@pytest.mark.skipif(CHROMIUM is None, reason='chromium not installed (`apt-get install chromium`): the browser check of '
                    'how the math looks is skipped; test_math_renders_offline still checks the HTML')
def test_math_screenshot(site, tmp_path):
    "In a browser without network a formula is typeset: a fraction is drawn stacked, not as the text `\\frac{...}`"
    from xwlearn.docs import pandoc, clean_nb, tex_html, CSS
    tex = r'\hat v_t = \frac{v_t}{1-\beta_2^t}'
    md = {'cell_type': 'markdown', 'metadata': {}, 'source': f'$${tex}$$'}
    bodies = {'mathml': pandoc(clean_nb({'cells': [md]})[0]), 'svg': tex_html(tex, display=True), 'tex': escape(f'\\[{tex}\\]')}
    box = {}
    for k, body in bodies.items():
        f = tmp_path/f'{k}.html'
        f.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{CSS}</style></head>'
                     f'<body style="font-size:24px"><main>{body}</main></body></html>')
        box[k] = _ink_box(_screenshot(f, tmp_path/f'{k}.png', '1200,400'))
    w, h = box['tex']  # the TeX source: one long line of text
    for k in ('mathml', 'svg'):
        assert box[k][0] < 0.6*w and box[k][1] > 1.5*h, f'{k} does not look typeset: ink boxes (w, h) {box}'
    # a built derivation page against the same page showing TeX source (what the MathJax build showed offline)
    out, _ = site
    page = out/ADAX
    twin = page.with_name('_raw_tex_twin.html'); twin.write_text(_as_raw_tex(page.read_text()))
    try: shot, raw = _screenshot(page, tmp_path/'adax.png'), _screenshot(twin, tmp_path/'adax_raw_tex.png')
    finally: twin.unlink()
    assert shot.shape == raw.shape and (shot != raw).mean() > 0.002, 'the AdaX page looks the same as its raw-TeX twin'
