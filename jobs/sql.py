"""spark-submit entry point of the deepcuts sql command: wiring only (see deepcuts.core.cli)."""
import sys

from deepcuts.core.catalog import sql_main

if __name__ == "__main__":
    sys.exit(sql_main(sys.argv[1:]))
