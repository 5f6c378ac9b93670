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

def test_reproduce_side_by_side_then_reused_then_forced(tmp_path):
    "Two papers in child processes (-j 2); an unchanged re-run reuses both rows in seconds; --force runs again."
    r = run("reproduce", "mage,psbn", "-j", "2", "--test", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "started mage" in r.stdout and "started psbn" in r.stdout and (tmp_path/"logs"/"mage.log").exists()
    html = (tmp_path/"claims.html").read_text()  # the page to look at, figures inline
    assert html.count('class="card') >= 2 and "data:image/png;base64," in html, html[:500]
    claims = {c["key"]: c for c in json.loads((tmp_path/"claims.json").read_text())}
    assert set(claims) == {"mage", "psbn"} and all(c["fingerprint"]["modules"] and not c["reused"] for c in claims.values())
    assert "xwlearn.repro.mage" in claims["mage"]["fingerprint"]["modules"]
    r = run("reproduce", "mage,psbn", "-j", "2", "--test", "--out", str(tmp_path))
    assert r.returncode == 0 and r.stdout.count("reused (--force re-runs)") == 2, r.stdout
    claims = {c["key"]: c for c in json.loads((tmp_path/"claims.json").read_text())}
    assert all(c["reused"] for c in claims.values())
    assert "nothing it depended on changed" in (tmp_path/"claims.md").read_text()
    r = run("reproduce", "mage", "--force", "--test", "--out", str(tmp_path))
    assert r.returncode == 0 and "reused" not in r.stdout.split("wrote")[0], r.stdout
    assert not {c["key"]: c for c in json.loads((tmp_path/"claims.json").read_text())}["mage"]["reused"]

def test_a_changed_module_invalidates_the_row(tmp_path):
    from xwlearn.core import read_claims, fingerprint_matches, write_claims
    r = run("reproduce", "mage", "--test", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    c = read_claims(tmp_path)["mage"]
    assert fingerprint_matches(c.fingerprint, test=True, threads=1) == (True, "")
    c.fingerprint["modules"]["xwlearn.agents.mage"] = "0" * 40   # as if the method module had been edited since
    write_claims([c], tmp_path)
    r = run("reproduce", "mage", "--test", "--out", str(tmp_path))
    assert r.returncode == 0 and "reused" not in r.stdout.split("wrote")[0], r.stdout

def test_timing_reproductions_run_alone():
    from xwlearn.core import PAPERS, REPRODUCTIONS
    for k in ("relay_attention", "biformer", "group_fisher"): PAPERS[k].load()
    assert all(REPRODUCTIONS[k].exclusive for k in ("relay_attention", "biformer", "group_fisher"))
    from xwlearn.cli import schedule
    waves = schedule(["adax", "biformer", "kalman", "relay_attention", "psbn"], {"biformer", "relay_attention"}, 2)
    assert waves == [["biformer"], ["relay_attention"], ["adax", "kalman"], ["psbn"]]
