"""``python -m deepcuts COMMAND``: the jobs without spark-submit, plus operator helpers."""
import sys

from deepcuts.core.cli import STAGES, main, tables_main

USAGE = f"""usage: python -m deepcuts COMMAND [args]

commands:
  pipeline | {' | '.join(STAGES)}    run a job (same flags as spark-submit.sh JOB)
  demo-catalogue                 alias of `demo`: generate the demo catalogue and play counts
  tables                         list the committed warehouse tables
"""


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "tables":
        return tables_main(rest)
    if command == "demo-catalogue":
        command = "demo"
    if command in STAGES or command == "pipeline":
        return main(command, rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
