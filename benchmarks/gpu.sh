#!/usr/bin/env bash
# BraggNN figures on a GPU node: the same benchmark as on CPU, device "cuda" (AMP, pinned
# host memory, one stream: models.braggnn.BraggNNPredictor). Prints the GPU, then every
# section of benchmarks/braggnn.py. Run from the repository root:
#     bash benchmarks/gpu.sh            # uses .venv/bin/python, or $PYTHON
#     THREADS=8 bash benchmarks/gpu.sh  # CPU threads for the parts that stay on the CPU
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch (torch %s); this script is for a GPU "
                     "node. On a CPU, run: .venv/bin/python benchmarks/braggnn.py"
                     % torch.__version__)
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda)
PY
exec "$PYTHON" benchmarks/braggnn.py --device cuda --threads "${THREADS:-4}" \
    --n "${N:-20000}" --fit-n "${FIT_N:-2000}" --frames "${FRAMES:-10}" \
    --real-step "${REAL_STEP:-6}" "$@"
