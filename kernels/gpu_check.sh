#!/usr/bin/env bash
# One prepared GPU session: the kernel tests on CUDA, then every benchmark of kernels/bench_*.py.
# Usage (repo root, on a machine with an NVIDIA GPU): bash kernels/gpu_check.sh [OUT_DIR]
# Wheels for packages the GPU image lacks may sit in .whl/ (installed to /tmp/site): the AdaX benchmark imports
# xwlearn.optim.adax, hence fastai 2.8.12 with fastcore, fasttransform, fastdownload, plum-dispatch, beartype and
# fastprogress 1.0.3 (1.1.x needs fasthtml, which the NVIDIA image lacks). The relay and BRA kernels need only torch + triton.
set -u
OUT=${1:-kernels/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "== kernel tests on CUDA"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --timeout 200 -k "cuda or gpu" tests/test_kernels_*.py 2>&1 \
  | tee "$OUT/tests.log" | tail -40
echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-300} python3 kernels/bench.py --out "$OUT" ${BENCH_ONLY:+--only $BENCH_ONLY} 2>&1 | tee "$OUT/bench.log"
