#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py has the details):
#   bash scripts/gpu_check.sh REPORT_DIR [--dry-run] [--budget S] [--work DIR] [--no-install]
# Uses $PYTHON when set, else .venv/bin/python when there is one, else python3. PYTHONPATH is
# passed on (a lent machine's DALI: export PYTHONPATH=/tmp/site:$PWD first).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
exec "$py" scripts/gpu_check.py "$@"
