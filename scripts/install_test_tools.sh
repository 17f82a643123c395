#!/usr/bin/env bash
# Debian packages for two tests, installed through apt where this runs as root (else a note says what to install):
# Chromium (the chat page, driven by Playwright, which never downloads a browser) and Go (Ollama renders a
# Modelfile's TEMPLATE with Go's text/template: the export test runs the real one). scripts/run_tests.sh runs it.
# Idempotent: quick when all is there.
set -euo pipefail
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
