#!/usr/bin/env bash
# Installs everything the project needs into the current Python: the CPU build of torch first (a plain "torch"
# would pull a several-GB CUDA build), then requirements.txt, then Debian's Chromium for the chat page's browser
# test (Playwright drives the system browser; it never downloads one). Idempotent: quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for the browser test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
  else
    echo "note: no chromium; the browser test needs it: sudo apt-get install chromium" >&2
  fi
fi
