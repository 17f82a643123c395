#!/usr/bin/env bash
# Installs the Python packages the project needs into the current Python: the CPU build of torch first (a plain
# "torch" would pull a several-GB CUDA build), then requirements.txt. What scripts/quickstart.sh runs; the
# test-only system packages (Chromium, Go) are scripts/install_test_tools.sh, which scripts/run_tests.sh adds.
# Idempotent: quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
