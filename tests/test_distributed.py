"""Data parallelism and checkpoint/resume of `xwlearn train`, tested for real: processes are launched and killed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch

from xwlearn.data import write_cifar10_pickles

PY = sys.executable
ENV = {**os.environ, "XWLEARN_THREADS": "1", "PYTHONWARNINGS": "ignore"}

def _fixture(root, n_train, n_test=32, seed=0):
    g = np.random.default_rng(seed)
    write_cifar10_pickles(root, g.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), g.integers(0, 10, n_train),
                          g.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), g.integers(0, 10, n_test))
    return root

def _check_audits(aud, n_train, n_valid, epochs):
    recs = [json.loads((aud/f"audit_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in recs] == [2, 2]
    for e in range(epochs):
        a, b = (set(r["epochs"][e]["train"]) for r in recs)
        assert a.isdisjoint(b), f"epoch {e}: ranks share training samples"
        assert a | b == set(range(n_train)), f"epoch {e}: the two halves do not cover the training set"
        assert len(a) == len(b) == n_train // 2
        va, vb = (set(r["epochs"][e]["valid"]) for r in recs)
        assert va | vb == set(range(n_valid)) and va.isdisjoint(vb)
    # a new shuffle every epoch
    assert recs[0]["epochs"][0]["train"] != recs[0]["epochs"][1]["train"]
    d0, d1 = recs[0]["digests"], recs[1]["digests"]
    assert len(d0) == len(d1) == epochs * (n_train // 2 // 16)  # bs 16 per rank in smoke mode
    assert d0 == d1, "parameters differ between ranks after some step: gradients are not synchronised"
    assert len(set(d0)) == len(d0), "parameters did not change at some step"
    assert recs[0]["checkpoints_written"] == epochs and recs[1]["checkpoints_written"] == 0

def test_torchrun_two_cpu_processes(tmp_path):
    data = _fixture(tmp_path/"cifar", 64)
    run, aud = tmp_path/"run", tmp_path/"audit"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "xwlearn",
           "train", "smoke_cifar10", "--data", str(data), "--smoke", "--epochs", "2", "--out", str(run),
           "--audit", str(aud), "--quiet"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_audits(aud, 64, 32, 2)
    assert sorted(os.listdir(run)) == [".lock", "last.pth", "model.pth", "run.json"]
    ck = torch.load(run/"last.pth", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["history"]) == 2

def test_accelerate_launch_two_cpu_processes(tmp_path):
    pytest.importorskip("accelerate")
    data = _fixture(tmp_path/"cifar", 64)
    aud = tmp_path/"audit"
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519", "-m", "xwlearn",
           "train", "smoke_cifar10", "--data", str(data), "--smoke", "--epochs", "2", "--out", str(tmp_path/"run"),
           "--audit", str(aud), "--quiet"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_audits(aud, 64, 32, 2)

def test_kill_and_resume(tmp_path):
    "SIGKILL mid-run, then --resume: the run ends with bitwise the weights of an uninterrupted run (augmentation, dropout, 2 loader workers)."
    data = _fixture(tmp_path/"cifar", 4096)
    run, straight = tmp_path/"run", tmp_path/"straight"
    cmd = [PY, "-m", "xwlearn", "train", "smoke_cifar10", "--data", str(data), "--epochs", "6", "--quiet"]
    p = subprocess.Popen(cmd + ["--out", str(run)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, done = time.time() + 240, -1
    while time.time() < deadline and p.poll() is None:
        if (run/"last.pth").exists():
            try: done = torch.load(run/"last.pth", weights_only=True)["epoch"]
            except Exception as e: pytest.fail(f"last.pth unreadable while training: {e}")  # atomic writes: never
            if done >= 1: break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed: make the fixture larger"
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = torch.load(run/"last.pth", weights_only=True)["epoch"]
    assert 1 <= killed_at < 5
    assert not (run/"model.pth").exists()
    r = subprocess.run(cmd + ["--out", str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "already holds an unfinished run" in r.stderr and "--resume" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--out", str(run), "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from {run/'last.pth'} at epoch {killed_at + 1}/6" in r.stdout, r.stdout
    ck = torch.load(run/"last.pth", weights_only=True)
    assert ck["epoch"] == 5 and len(ck["history"]) == 6, (ck["epoch"], ck["history"])
    r = subprocess.run(cmd + ["--out", str(straight)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(d/"model.pth", weights_only=True) for d in (run, straight))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff == 0, f"resumed and uninterrupted runs differ: max |dW| = {diff}"
    # resuming a finished run does nothing and says so; a plain re-run is refused and the weights stay
    r2 = subprocess.run(cmd + ["--out", str(run), "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "already done" in r2.stdout
    r3 = subprocess.run(cmd + ["--out", str(run)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r3.returncode == 2 and "already holds a finished run" in r3.stderr, r3.stderr
    assert all(torch.equal(v, a[k]) for k, v in torch.load(run/"model.pth", weights_only=True).items())

def test_wrong_data_path_is_a_clear_error(tmp_path):
    r = subprocess.run([PY, "-m", "xwlearn", "train", "smoke_cifar10", "--data", str(tmp_path/"nowhere"), "--smoke"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "cifar-10-batches-py" in r.stderr and "Traceback" not in r.stderr, r.stderr
