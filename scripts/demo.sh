#!/usr/bin/env bash
# The main job on the embedded demo model: set up .venv (first run only), then the whole pipeline.
source "$(dirname "$0")/env.sh"
exec python -m powerinfer_py.cli demo "$@"
