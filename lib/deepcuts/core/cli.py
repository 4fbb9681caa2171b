"""Command-line wiring shared by the jobs: arguments, config, logging, the run summary.

Every stage is a function ``run(spark, cfg, run_id) -> dict`` (its summary) registered
in ``STAGES``; ``jobs/<stage>.py`` is just ``main("<stage>")``.  The ``pipeline`` job runs
the nightly sequence in one Spark application.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from typing import Callable, Sequence

from deepcuts.core.config import ConfigError, load_config

log = logging.getLogger("deepcuts")

# stage name -> "module:function"; each function is run(spark, cfg, run_id) -> summary dict.
STAGES: dict[str, str] = {
    "demo": "deepcuts.demo.generate:run_stage",
    "ingest": "deepcuts.stages.ingest:run",
    "factors": "deepcuts.stages.factors:run",
    "train": "deepcuts.stages.train:run",
    "infer": "deepcuts.stages.infer:run",
}
# The nightly order; `demo` only runs in the pipeline when its data is missing.
PIPELINE = ("demo", "ingest", "factors", "train", "infer")
NEEDS_NO_SPARK = {"demo"}


def stage_function(name: str) -> Callable:
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def parse_args(job: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"spark-submit.sh {job}",
                                description=f"deepcuts {job} job (defaults: conf/deepcuts.toml)")
    p.add_argument("--conf-file", help="a TOML file layered over conf/deepcuts.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--stages", default=",".join(PIPELINE),
                   help="pipeline only: comma-separated stages to run, in order")
    return p.parse_args(argv)


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        out[key.strip()] = value.strip()
    return out


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "numba", "botocore", "urllib3", "s3transfer", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(stage: str, summary: dict, seconds: float) -> None:
    print(f"\n=== deepcuts {stage}: done in {seconds:.1f} s", flush=True)
    for key, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
            print(f"  {key:<24} {inner}")
        else:
            print(f"  {key:<24} {value}")
    sys.stdout.flush()


def main(job: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<job>.py``: exits 2 on a config error, 1 on a failed stage."""
    from deepcuts.core.warehouse import new_run_id
    setup_logging()
    args = parse_args(job, argv)
    try:
        cfg = load_config(args.conf_file, _overrides(args.overrides))
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if job == "pipeline" else [job]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
    except ConfigError as exc:
        print(f"deepcuts {job}: configuration error: {exc}", file=sys.stderr)
        return 2
    spark = None
    results = {}
    try:
        for stage in stages:
            if job == "pipeline" and stage == "demo":
                from deepcuts.demo.generate import demo_data_present
                if demo_data_present(cfg):
                    log.info("demo catalogue present in %s: not regenerated", cfg.demo.out_dir)
                    continue
            if spark is None and stage not in NEEDS_NO_SPARK:
                from deepcuts.core.spark import get_session
                spark = get_session(cfg, f"{cfg.spark.app_name}-{job}")
                spark.sparkContext.setLogLevel("WARN")
            run_id = new_run_id(f"{stage}-")
            started = time.time()
            log.info("stage %s: run %s", stage, run_id)
            summary = stage_function(stage)(spark, cfg, run_id)
            results[stage] = summary
            print_summary(stage, {"run_id": run_id, **summary}, time.time() - started)
    except ConfigError as exc:
        print(f"deepcuts {job}: configuration error: {exc}", file=sys.stderr)
        return 2
    finally:
        if spark is not None:
            spark.stop()
    return 0


def tables_main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepcuts tables``: the committed tables and where their files are."""
    from deepcuts.core.spark import warehouse
    p = argparse.ArgumentParser(prog="deepcuts tables")
    p.add_argument("--conf-file")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--files", action="store_true", help="print every data file of every table")
    args = p.parse_args(argv)
    wh = warehouse(load_config(args.conf_file, _overrides(args.overrides)))
    for row in wh.describe():
        print(json.dumps(row))
        if args.files:
            for f in wh.files(row["table"], local=True):
                print("   ", f)
    return 0
