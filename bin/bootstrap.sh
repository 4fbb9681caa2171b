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
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing the pinned stack into .venv (a few minutes the first time)" >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi

# JVM packages (Delta Lake, s3a) from Maven Central, once: Spark's own Ivy resolves them and
# their dependencies; the jars land in .venv/jars (spark-submit.sh passes them as --jars).
jar_stamp=.venv/jars/.packages
packages=$(grep -v '^#' conf/jvm-packages.txt | sed '/^\s*$/d' | paste -sd, -)
if [ ! -f "$jar_stamp" ] || [ "$(cat "$jar_stamp")" != "$packages" ]; then
  echo "bootstrap: fetching JVM packages $packages" >&2
  rm -rf .venv/jars .venv/ivy/jars && mkdir -p .venv/jars
  noop=$(mktemp --suffix=.py) && echo 'pass' > "$noop"
  if ! PYSPARK_PYTHON=.venv/bin/python PATH="$PWD/.venv/bin:$PATH" .venv/bin/spark-submit --master 'local[1]' \
        --conf spark.jars.ivy="$PWD/.venv/ivy" --packages "$packages" "$noop" >.venv/ivy-resolve.log 2>&1; then
    echo "bootstrap: Ivy could not resolve $packages from Maven Central (see .venv/ivy-resolve.log)" >&2
    rm -f "$noop"; exit 1
  fi
  rm -f "$noop"
  cp .venv/ivy/jars/*.jar .venv/jars/ 2>/dev/null || true
  ls .venv/jars/*.jar >/dev/null
  echo "$packages" > "$jar_stamp"
fi

# Pretrained weights for train.transfer = "musicnn" (issue 13), once: musicnn's MSD_vgg checkpoint
# from the musicnn wheel on PyPI (downloaded, not installed), converted to a torch state dict in
# the venv.  Without it the pipeline still runs: train.model = "auto" fits its ridge candidate on the
# random-conv features alone (and says so); only an explicit train.model = "ridge" refuses to start.
weights=.venv/share/deepcuts/musicnn-msd_vgg.pt
if [ ! -f "$weights" ]; then
  echo "bootstrap: converting musicnn's pretrained MSD_vgg weights into $weights" >&2
  .venv/bin/python -m deepcuts.nn.pretrained install "$weights" >&2 ||
    echo "bootstrap: could not fetch or convert the musicnn weights; train.transfer = 'musicnn' is unavailable" >&2
fi

# Test-only (`bin/bootstrap.sh --test`, as run-tests.sh calls it): the encoders that
# tests/encoder_fixtures.py makes real-encoder files with (issue 10), installed only when one is
# missing and we are root; otherwise those tests skip and say why.
if [ "${1:-}" = "--test" ]; then
  missing=""
  for tool in lame ffmpeg sox opusenc opusdec oggenc oggdec flac; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "bootstrap: installing the test encoders (missing:$missing)" >&2
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          lame ffmpeg sox opus-tools vorbis-tools flac >/dev/null; } ||
        echo "bootstrap: apt-get could not install the test encoders; tests/test_real_encoders.py will skip" >&2
    else
      echo "bootstrap: test encoders missing:$missing; tests/test_real_encoders.py will skip" \
           "(install: sudo apt-get install lame ffmpeg sox opus-tools vorbis-tools flac)" >&2
    fi
  fi
fi

# Test-only too: Debian's chromium, which tests/test_report.py opens the run report in (headless,
# through Playwright with executable_path; Playwright never downloads a browser here).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing chromium for the report's browser test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "bootstrap: apt-get could not install chromium; the browser test of tests/test_report.py will skip" >&2
  else
    echo "bootstrap: chromium missing; the browser test of tests/test_report.py will skip" \
         "(install: sudo apt-get install chromium)" >&2
  fi
fi
