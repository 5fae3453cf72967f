#!/usr/bin/env bash
# The GPU check (issue 15, part 5): at most about 5 minutes on one H100/H200-class GPU.
# 1. the tests that run only with CUDA (masking and augmentation on the device: CPU and GPU give the same pixels);
# 2. benchmarks/gpu_check.py: the table of training, loading, masking, prediction and SHAP rates (see its docstring).
# Run from the repository root after `make setup`: `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '· torch', torch.__version__, '· CUDA', torch.version.cuda)"
# the CUDA-only tests skip themselves without a GPU; -rs lists any that still skipped
"$PY" -m pytest -q -rs tests/test_masking.py tests/test_augment.py -k "cuda or gpu or device"
"$PY" benchmarks/gpu_check.py "$@"
