#!/usr/bin/env bash
# The README's test command: install what is missing, prepare the default model, run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not real_model" for the unit tests alone, in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/get_demo_model.sh
python3 -m pytest -q "$@"
