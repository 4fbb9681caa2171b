"""``python -m deepcuts COMMAND``: the jobs without spark-submit, plus operator and analyst helpers."""
import sys

from deepcuts.core.cli import main
from deepcuts.core.registry import STAGES

# command -> "module:function" taking argv (helpers that are not stages).
COMMANDS = {
    "tables": "deepcuts.core.cli:tables_main",
    "sql": "deepcuts.core.catalog:sql_main",
    "demo-catalogue": "deepcuts.core.cli:demo_catalogue_main",
    "similar": "deepcuts.knn.query:similar_main",
    "evaluate": "deepcuts.stages.evaluate:evaluate_main",
}

USAGE = f"""usage: python -m deepcuts COMMAND [args]

commands:
  nightly | pipeline | {' | '.join(STAGES)}    run a job (same flags as spark-submit.sh JOB)
  tables                         list the Delta tables (version, rows, files, size)
  sql "SELECT ..."               Spark SQL over deepcuts.<table> (time travel: deepcuts.<table>@v<N>)
  demo-catalogue                 render the demo catalogue and play counts (run-demo.sh)
  similar FILE... [--k K] [--index NAME] [--json]  query by audio: the catalogue tracks that sound most like FILE
  evaluate [--model ID] [--splits S] [--predictors P]  every predictor on the same users and candidates: print the table
"""


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        import importlib
        module, func = COMMANDS[command].split(":")
        return getattr(importlib.import_module(module), func)(rest)
    if command in STAGES or command in ("pipeline", "nightly"):
        return main(command, rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
