#!/usr/bin/env bash
# The README's test command: install what is missing (the Python packages, then the browser and Go for two tests),
# prepare the default model, run the whole test suite, printing the 15 slowest tests at the end.
# Two pytest-xdist workers (TEST_WORKERS=N for another count, 0 for none): on a 2-core machine the suite took
# 10 min 8 s with two against 14 min 23 s in one process (2026-12-02, AMD EPYC).
# Extra arguments go to pytest (e.g. -m "not real_model" for the unit tests alone, in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_test_tools.sh
bash scripts/get_demo_model.sh
python3 -m pytest -q -n "${TEST_WORKERS:-2}" --durations=15 "$@"
