#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py has the details):
#   bash scripts/gpu_check.sh REPORT_DIR [--no-install] [--dry-run] [--budget S]
# Uses .venv/bin/python when there is one, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" scripts/gpu_check.py "$@"
