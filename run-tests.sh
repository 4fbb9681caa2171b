#!/usr/bin/env bash
# The second README command (and what CI runs): install what is needed, then the whole test suite.
# Extra arguments go to pytest, e.g. ./run-tests.sh -m "not slow" for the quick tier.
set -euo pipefail
cd "$(dirname "$0")"
bin/bootstrap.sh --test
exec .venv/bin/python -m pytest "$@"
