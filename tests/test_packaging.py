"""The wheel holds every subpackage, and an installed wheel imports them (nbdev's template default drops subpackages)."""
import subprocess, sys, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_wheel_contains_every_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    whl, = tmp_path.glob("xwlearn-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    mods = {str(p.relative_to(ROOT)) for p in (ROOT/"xwlearn").rglob("*.py")}
    assert mods <= names, f"missing from the wheel: {sorted(mods - names)}"
    assert "xwlearn/optim/adax.py" in names
    # installed from the wheel alone (outside the source tree), the subpackage imports
    site = tmp_path/"site"
    zipfile.ZipFile(whl).extractall(site)
    r = subprocess.run([sys.executable, "-c", "import xwlearn.optim.adax as m, sys; print(m.__file__)"],
                       cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(site) in r.stdout
