# Sourced by scripts/test.sh and scripts/demo.sh: create .venv if needed and install the project into it.
# torch is pinned to the CPU wheel this project's machines carry (an unpinned torch pulls a multi-GB CUDA build);
# set POWERINFER_TORCH to another spec (or "skip" when torch is already installed) elsewhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import powerinfer_py, torch, pytest, transformers" 2>/dev/null || [ "${POWERINFER_REINSTALL:-0}" = 1 ]; then
    python -m pip install -q --upgrade pip
    if [ "${POWERINFER_TORCH:-torch==2.13.0}" != skip ] && ! python -c "import torch" 2>/dev/null; then
        python -m pip install -q "${POWERINFER_TORCH:-torch==2.13.0}"
    fi
    python -m pip install -q -e ".[test]"
fi
