"""A catalog for analysts: every Delta table of the warehouse as ``deepcuts.<table>``.

``python -m deepcuts sql "SELECT ..."`` (and ``./spark-submit.sh sql``) opens a Spark
session with the tables registered (external tables over their Delta locations; nothing
is copied) and prints the result.  Time travel: ``deepcuts.<table>@v<N>`` or
``deepcuts.<table> VERSION AS OF N``.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from typing import Sequence

from deepcuts.core.lake import Lake

DATABASE = "deepcuts"
_AT_VERSION = re.compile(rf"\b{DATABASE}\.(\w+)@v(\d+)\b")


def register_tables(spark, lk: Lake, database: str = DATABASE) -> list[str]:
    """``CREATE TABLE <database>.<t> USING DELTA LOCATION ...`` for every table present."""
    location = tempfile.mkdtemp(prefix="deepcuts-catalog-")
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database} LOCATION '{location}'")
    names = []
    for row in lk.describe():
        name = row["table"]
        spark.sql(f"CREATE TABLE IF NOT EXISTS {database}.{name} USING DELTA LOCATION '{lk.table_uri(name)}'")
        names.append(name)
    return names


def rewrite_time_travel(sql: str, lk: Lake) -> str:
    """``deepcuts.t@v3`` -> Delta's path form with a version, which Spark SQL reads directly."""
    return _AT_VERSION.sub(lambda m: f"delta.`{lk.table_uri(m.group(1))}@v{m.group(2)}`", sql)


def sql_main(argv: Sequence[str] | None = None) -> int:
    from deepcuts.core.cli import EXIT_CONFIG, add_config_args, config_or_report
    from deepcuts.core.lake import lake
    from deepcuts.core.spark import get_session
    p = argparse.ArgumentParser(prog="deepcuts sql", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("query", help="a Spark SQL query over deepcuts.<table>")
    p.add_argument("--limit", type=int, default=50, help="rows printed (default 50)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = p.parse_args(argv)
    cfg = config_or_report(args, "sql")
    if cfg is None:
        return EXIT_CONFIG
    lk = lake(cfg)
    spark = get_session(cfg, f"{cfg.spark.app_name}-sql")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        register_tables(spark, lk)
        result = spark.sql(rewrite_time_travel(args.query, lk))
        if args.json:
            import json
            for row in result.limit(args.limit).collect():
                print(json.dumps(row.asDict(recursive=True), default=str))
        else:
            result.show(args.limit, truncate=False)
    finally:
        spark.stop()
    return 0
