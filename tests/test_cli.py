"""The `xwlearn` command as a user runs it (a subprocess, like the shell)."""
import json, os, subprocess, sys
import pytest
from pathlib import Path

PY = sys.executable
ENV = {**os.environ, "XWLEARN_THREADS": "1"}

def run(*args, **kw):
    return subprocess.run([PY, "-m", "xwlearn", *args], env=ENV, capture_output=True, text=True, timeout=600, **kw)

def test_list():
    r = run("list")
    assert r.returncode == 0, r.stderr
    assert "adax" in r.stdout and "mage" in r.stdout and "smoke_cifar10" in r.stdout
    assert len([l for l in r.stdout.splitlines() if "nbs/" in l]) == 26

def test_unknown_keys_are_clear_errors():
    r = run("reproduce", "nope")
    assert r.returncode == 2 and "no reproduction registered as 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "nope", "--data", ".")
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr

from xwlearn.core import PAPERS, VERDICTS
IMPLEMENTED = sorted(k for k, p in PAPERS.items() if p.implemented())

@pytest.mark.parametrize("key", IMPLEMENTED)
def test_reproduce_test_scale_writes_report(tmp_path, key):
    "Every paper's reproduction runs from the command line (outside its notebook) and lands in the report."
    r = run("reproduce", key, "--test", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (tmp_path/"claims.md").read_text()
    assert PAPERS[key].title.split(":")[0] in md and "TEST SCALE" in md
    claims = {c["key"]: c for c in json.loads((tmp_path/"claims.json").read_text())}
    assert set(claims) == {key}
    c = claims[key]
    assert c["verdict"] in VERDICTS and c["measured"] and c["checks"], c
    for p in c["plots"]: assert (tmp_path/p).exists(), p

def test_reproduce_all_runs_every_paper(tmp_path, monkeypatch):
    "`reproduce all` runs each implemented paper's reproduction once (here with the runs themselves stubbed out)."
    import xwlearn.cli as cli
    from xwlearn.core import Claim
    seen = []
    def fake(k, out, test=False):
        seen.append(k)
        return Claim(k, k, "c", "p", "m", "s", "partly", 0.0, test=test)
    monkeypatch.setattr(cli, "run_reproduction", fake)
    assert cli.cmd_reproduce("all", str(tmp_path), test=True) == 0
    assert seen == IMPLEMENTED
    assert {c["key"] for c in json.loads((tmp_path/"claims.json").read_text())} == set(IMPLEMENTED)

def test_bench_skips_without_gpu():
    import torch
    r = run("bench")
    assert r.returncode == 0
    if not torch.cuda.is_available(): assert "skipped" in r.stdout and "no CUDA GPU" in r.stdout
