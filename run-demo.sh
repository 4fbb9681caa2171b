#!/usr/bin/env bash
# The first README command: install what is needed, then run the whole nightly pipeline on the
# embedded default (Spark local[*], a generated demo catalogue, ./warehouse).
# Extra arguments go to the pipeline job, e.g. ./run-demo.sh --stages ingest,factors
set -euo pipefail
cd "$(dirname "$0")"
bin/bootstrap.sh
# The demo catalogue is rendered here, never by the nightly job (skipped when present).
.venv/bin/python -m deepcuts demo-catalogue
exec ./spark-submit.sh pipeline "$@"
