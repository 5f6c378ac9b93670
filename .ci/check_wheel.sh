#!/usr/bin/env bash
# The README's promise, checked as a new user meets it: the wheel, installed WITHOUT extras into a clean venv (torch from
# the local wheel cache), imports every method module and creates every xw_* model; what needs an extra says which.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PY=${PYTHON:-python3}
.venv/bin/python -m pip wheel -q --no-deps -w "$tmp/dist" .
$PY -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
"$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/xwlearn-*.whl
echo "wheel installed without extras: $(( $(date +%s) - start )) s"
cp .ci/check_wheel.py "$tmp/"
(cd "$tmp" && XWLEARN_CACHE="$tmp/cache" "$tmp/venv/bin/python" check_wheel.py)
echo "check-wheel wall time: $(( $(date +%s) - start )) s"
