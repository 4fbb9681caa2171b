#!/usr/bin/env bash
# Make this checkout runnable: Java 17 for Spark, and .venv with the pinned stack.
# Idempotent and quick when nothing changed (a stamp records the hash of the requirement files).
set -euo pipefail
cd "$(dirname "$0")/.."

need_java() {
  command -v java >/dev/null 2>&1 || return 0
  local v
  v=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}' | cut -d. -f1)
  [ "${v:-0}" -ge 17 ] 2>/dev/null && return 1 || return 0
}
if need_java; then
  echo "bootstrap: Java 17+ not found; installing openjdk-17-jre-headless" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    echo "bootstrap: cannot install Java here (not root or no apt-get). Install a Java 17 runtime" \
         "(e.g. 'sudo apt-get install openjdk-17-jre-headless') and set JAVA_HOME, then re-run." >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "bootstrap: deepcuts needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp=.venv/.deepcuts-deps
want=$(cat requirements.txt requirements-test.txt setup.py | sha1sum | cut -c1-40)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: installing the pinned stack into .venv (a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip check
echo "$want" > "$stamp"
