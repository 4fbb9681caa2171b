"""spark-submit entry point of the deepcuts infer job: wiring only (see deepcuts.cli)."""
import sys

from deepcuts.cli import main

if __name__ == "__main__":
    sys.exit(main("infer"))
