#!/usr/bin/env bash
# The test command: set up .venv (first run only) and run the suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
set +e
python -m pytest -q "$@"
rc=$?
[ $rc -eq 5 ] && { echo "pytest collected no tests"; exit 1; }
exit $rc
