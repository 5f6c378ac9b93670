"""`kernels/bench.py`, the GPU benchmark driver: the parts that run without a GPU."""
import importlib.util, json
from pathlib import Path

KERNELS = Path(__file__).parents[1] / "kernels"


def _driver():
    spec = importlib.util.spec_from_file_location("xw_bench_driver", KERNELS / "bench.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_record_keeps_other_benches(tmp_path):
    "Running one benchmark adds its result next to the ones recorded earlier instead of replacing the file."
    d = _driver(); f = tmp_path / "GPU.json"
    f.write_text(json.dumps(dict(gpu="GPU", date="old", benches=dict(relay=dict(rows={"a": dict(ms=1.0)})), runs=["run1"])))
    run = dict(gpu="GPU", torch="t", triton="x", date="new", copy_roof_gbps=3000.0)
    d.record(f, run, "adax_step", dict(rows={"b": dict(ms=2.0)}))
    res = json.loads(f.read_text())
    assert res["benches"]["relay"] == dict(rows={"a": dict(ms=1.0)})           # untouched
    assert res["benches"]["adax_step"] == dict(rows={"b": dict(ms=2.0)}, run=run)  # with its own run's card/versions
    assert res["date"] == "new" and res["runs"] == ["run1"]
    assert not list(tmp_path.glob("*.tmp"))
    d.record(tmp_path / "fresh.json", run, "bra", dict(error="boom"))         # no file yet
    assert json.loads((tmp_path / "fresh.json").read_text())["benches"] == dict(bra=dict(error="boom", run=run))


def test_discover_finds_every_script():
    "Every kernels/bench_<name>.py is found and exposes `bench`; the scripts share the driver's roof measurement."
    d = _driver(); found = d.discover()
    assert set(found) == {f.stem[len("bench_"):] for f in KERNELS.glob("bench_*.py")} >= {"adax_step", "relay", "bra"}
    assert all(callable(fn) for fn in found.values())
    for name in ("adax_step", "relay", "bra"):
        assert found[name].__globals__["copy_roof_gbps"].__code__.co_filename == str(KERNELS / "bench.py")


def test_every_result_records_its_code_version(tmp_path):
    "A result carries the commit, a dirty flag and a content hash of each kernel module and of its bench script."
    d = _driver()
    v = d.code_version("relay")
    assert set(v) == {"commit", "dirty", "files"}
    assert "kernels/bench_relay.py" in v["files"] and "xwlearn/kernels/relay.py" in v["files"]
    assert all(len(h) == 12 for h in v["files"].values())
    (tmp_path / "xwlearn" / "kernels").mkdir(parents=True)
    f = tmp_path / "xwlearn" / "kernels" / "k.py"; f.write_text("a = 1\n")
    h1 = d.code_version(root=tmp_path)["files"]["xwlearn/kernels/k.py"]
    f.write_text("a = 2\n")
    assert d.code_version(root=tmp_path)["files"]["xwlearn/kernels/k.py"] != h1   # a changed kernel changes its hash
    assert d.code_version(root=tmp_path)["commit"] is None                            # not a git checkout: said, not guessed
