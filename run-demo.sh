#!/usr/bin/env bash
# The first README command: install what is needed, then run the whole nightly pipeline on the
# embedded default (Spark local[*], a generated demo catalogue, ./warehouse).
# Extra arguments go to the pipeline job, e.g. ./run-demo.sh --stages ingest,factors
set -euo pipefail
cd "$(dirname "$0")"
bin/bootstrap.sh
# The demo catalogue is rendered here, never by the nightly job (skipped when present).
.venv/bin/python -m deepcuts demo-catalogue
# The run's report (the report stage's summary names it): printed last, whatever the exit code.
summary=$(mktemp --suffix=.json)
rc=0
./spark-submit.sh nightly --summary-json "$summary" "$@" || rc=$?
report=$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["stages"].get("report", {}).get("report", ""))' \
         "$summary" 2>/dev/null || true)
rm -f "$summary"
if [ -n "$report" ]; then echo "report: $report"; fi
exit "$rc"
