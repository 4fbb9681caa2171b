"""spark-submit entry point of the operator's nightly job: wiring only (see deepcuts.core.cli)."""
import sys

from deepcuts.core.cli import main

if __name__ == "__main__":
    sys.exit(main("nightly"))
