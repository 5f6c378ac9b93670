"""The claims page (`xwlearn.report`): a report written by `xwlearn.core.write_claims` becomes one self-contained HTML
file — a card per paper, figures embedded, nothing fetched from the network — and the docs site gets the same page."""
import re
from pathlib import Path
import numpy as np
import pytest
from xwlearn.core import Claim, write_claims
from xwlearn.report import write_claims_page, data_uri

def _png(path:Path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.imsave(path, np.linspace(0, 1, 48).reshape(6, 8))

def _claims():
    checks = ["MLP acc %: AdaX-W > AdamW: holds (91.8 vs 91.1, higher is better: difference +0.7, 2·SE 0.36, n=3/3)"]
    return [Claim("adax", "adax", "AdaX-W < AdamW & co? no: better", "92.3 %", "91.8 %", "MNIST-1D MLP, 3 seeds", "reproduced",
                  95.0, plots=["adax.png"], values={"acc": [91.8]}, notes="toy", host="x86_64, 1 CPU thread(s)",
                  date="2025-01-02 03:04", checks=checks),
            Claim("kalman", "kalman", "BKN works at micro-batch 2", "76 %", "10 %", "TEST SCALE (seconds; not a reproduction)",
                  "not at this scale", 2.0, test=True, checks=["BKN ≈ BN: undecided (10 vs 45: difference -35, 2·SE nan, n=1/1)"])]

def test_write_claims_page(tmp_path):
    _png(tmp_path/"adax.png")
    write_claims(_claims(), tmp_path)
    page = write_claims_page(tmp_path)
    assert page == tmp_path/"claims.html" and page.exists()
    html = page.read_text()
    assert html.count('<article class="card') == 2
    assert data_uri(tmp_path/"adax.png") in html and 'src="data:image/png;base64,' in html     # the figure, embedded
    assert '<span class="badge reproduced">reproduced</span>' in html
    assert 'class="card not-at-this-scale test"' in html and "TEST SCALE" in html
    assert "AdaX-W &lt; AdamW &amp; co?" in html
    assert 'class="st holds"' in html and 'class="st undecided"' in html
    # nothing external: no scripts, stylesheets or fonts to fetch; the only absolute URLs are the papers on arXiv
    assert not re.search(r"<script|<link|<iframe|@import|url\(", html)
    assert {u.split("/abs/")[0] for u in re.findall(r'https?://[^\s"\'<>)]+', html)} == {"https://arxiv.org"}
    assert not list(tmp_path.glob(".claims.html.*"))  # the atomic write left no temp file

def test_write_claims_page_needs_a_report(tmp_path):
    with pytest.raises(FileNotFoundError, match="make reproduce"): write_claims_page(tmp_path)

def test_docs_claims_page(tmp_path):
    "The docs builder's page: the same cards, linked to the paper notebooks, and in the sidebar after the home page"
    from xwlearn.docs import claims_page
    items = [("xwlearn", "index.html", None), ("core", None, [])]
    (tmp_path/"site").mkdir()
    new = claims_page(tmp_path/"site", items, "xwlearn", reports=tmp_path/"none")  # no report yet
    assert new == [items[0], ("Claims vs measured", "claims.html", None), items[1]]
    assert "make reproduce" in (tmp_path/"site"/"claims.html").read_text()
    rep = tmp_path/"reports"; rep.mkdir(); _png(rep/"adax.png"); write_claims(_claims(), rep)
    claims_page(tmp_path/"site", items, "xwlearn", {"20_optimization/01_optim.adax.ipynb": ("20_optimization/optim.adax.html",)}, rep)
    html = (tmp_path/"site"/"claims.html").read_text()
    assert html.count('<article class="card') == 2 and 'src="data:image/png;base64,' in html
    assert '<a href="20_optimization/optim.adax.html">paper notebook</a>' in html
