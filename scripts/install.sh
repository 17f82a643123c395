#!/usr/bin/env bash
# Installs everything the project needs into the current Python: the CPU build of torch first (a plain "torch"
# would pull a several-GB CUDA build), then requirements.txt, then Debian's Chromium and Go for two tests (below).
# Idempotent: quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
# Debian packages for two tests: Chromium (the chat page, driven by Playwright, which never downloads a browser)
# and Go (Ollama renders a Modelfile's TEMPLATE with Go's text/template: the export test runs the real one)
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-liberation)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (Debian packages) for the browser and Modelfile tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "note: the browser and Modelfile tests need: sudo apt-get install ${missing[*]}" >&2
  fi
fi
