"""Exported code must run outside its notebook: a name defined only in a notebook's non-exported cells (a `plt`
imported for the notebook's own plots, say) works under nbdev-test but fails in `xwlearn reproduce`."""
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_no_undefined_names_in_the_library():
    r = subprocess.run([sys.executable, "-m", "pyflakes", str(ROOT/"xwlearn")], capture_output=True, text=True, timeout=300)
    bad = [l for l in r.stdout.splitlines() if "undefined name" in l]
    assert not bad, "names used in exported code but defined only in notebooks:\n" + "\n".join(bad)
