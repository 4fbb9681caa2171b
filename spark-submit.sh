#!/usr/bin/env bash
# Submit a deepcuts job to Spark.
#   ./spark-submit.sh JOB [--conf-file F] [--set section.key=value ...] [-- extra spark-submit args]
# Master: an explicit `-- --master URL`, else $SPARK_MASTER, else local[*].
# On a cluster, the executors need the same Python stack: ship it with e.g.
#   -- --archives deepcuts-env.tar.gz#env  and  PYSPARK_PYTHON=./env/bin/python
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${DEEPCUTS_VENV:-$HERE/.venv}

jobs() { for f in "$HERE"/jobs/*.py; do basename "$f" .py; done | tr '\n' ' '; }
usage() {
  cat <<USAGE
usage: ./spark-submit.sh JOB [--conf-file F] [--set section.key=value ...] [-- spark-submit args]

jobs: $(jobs)
  nightly    the operator's job: the registry's order (ingest, factors, train, ... report), stages with
             unchanged inputs skipped, quality gates; exit 0 ok, 1 stage failed, 2 config, 3 input, 4 gate
  pipeline   the same stages (or --stages A,B), every one run
  sql        Spark SQL over deepcuts.<table> (time travel: deepcuts.<table>@v<N>)

Defaults: conf/deepcuts.toml (pipeline) and conf/spark-defaults.conf (Spark).
Master: '-- --master URL' > \$SPARK_MASTER > local[*].
USAGE
}
if [ $# -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then usage; exit 0; fi
JOB=$1; shift
if [ ! -f "$HERE/jobs/$JOB.py" ]; then
  echo "spark-submit.sh: unknown job '$JOB'" >&2; usage >&2; exit 2
fi

job_args=(); spark_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; spark_args=("$@"); break; fi
  job_args+=("$1"); shift
done
master=${SPARK_MASTER:-local[*]}
for ((i = 0; i < ${#spark_args[@]}; i++)); do
  if [ "${spark_args[$i]}" = "--master" ]; then master=${spark_args[$((i + 1))]}; fi
done

if [ ! -x "$VENV/bin/spark-submit" ]; then
  echo "spark-submit.sh: $VENV has no Spark; run bin/bootstrap.sh first" >&2; exit 1
fi
# The package, with the defaults file bundled, for --py-files (executors and cluster drivers).
mkdir -p "$HERE/build"
"$VENV/bin/python" - "$HERE" <<'PY'
import sys, zipfile, pathlib
root = pathlib.Path(sys.argv[1])
with zipfile.ZipFile(root / "build" / "deepcuts.zip", "w", zipfile.ZIP_DEFLATED) as z:
    for f in sorted((root / "lib").rglob("*.py")):
        z.write(f, f.relative_to(root / "lib"))
    z.write(root / "conf" / "deepcuts.toml", "deepcuts/_conf/deepcuts.toml")
PY

export PYSPARK_PYTHON=${PYSPARK_PYTHON:-$VENV/bin/python}
export PYSPARK_DRIVER_PYTHON=${PYSPARK_DRIVER_PYTHON:-$VENV/bin/python}
case "$master" in local*) export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1} ;; esac
cd "$HERE"
# The JVM packages of conf/jvm-packages.txt (Delta Lake, s3a), fetched once by bin/bootstrap.sh;
# --jars ships them to every executor.
JARS_DIR=${DEEPCUTS_JARS:-$VENV/jars}
jars=$(ls "$JARS_DIR"/*.jar 2>/dev/null | paste -sd, -)
if [ -z "$jars" ]; then
  echo "spark-submit.sh: no JVM packages in $JARS_DIR; run bin/bootstrap.sh first" >&2; exit 1
fi
exec "$VENV/bin/spark-submit" --master "$master" \
  --properties-file "$HERE/conf/spark-defaults.conf" \
  --jars "$jars" \
  --py-files "$HERE/build/deepcuts.zip" \
  "${spark_args[@]}" \
  "$HERE/jobs/$JOB.py" "${job_args[@]}"
