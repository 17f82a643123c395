#!/usr/bin/env bash
# Prepare models/SmolLM2-135M-Instruct (idempotent). Extra args go to `python -m chatft.demo_model`,
# e.g. --force or --out DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" -m chatft.demo_model "$@"
