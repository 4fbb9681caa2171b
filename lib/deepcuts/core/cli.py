"""Command-line wiring shared by the jobs: arguments, config, logging, the run summary.

Every stage is registered in :mod:`deepcuts.core.registry` with the tables it reads and
writes; ``jobs/<stage>.py`` is just ``main("<stage>")``.  The ``pipeline`` job runs the
nightly sequence in one Spark application.  Each stage run gets a :class:`StageRun`
context and leaves a manifest row in the ``runs`` table.

Exit codes: 0 ok, 2 configuration error, 1 a stage failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from typing import Sequence

from deepcuts.core.config import ConfigError, load_config
from deepcuts.core.registry import NIGHTLY, STAGES

log = logging.getLogger("deepcuts")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def parse_args(job: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"spark-submit.sh {job}",
                                description=f"deepcuts {job} job (defaults: conf/deepcuts.toml)")
    add_config_args(p)
    p.add_argument("--stages", default=",".join(NIGHTLY),
                   help="pipeline only: comma-separated stages to run, in order")
    p.add_argument("--summary-json", metavar="FILE", help="also write every stage's summary to FILE as JSON")
    return p.parse_args(argv)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf-file", help="a TOML file layered over conf/deepcuts.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")


def overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected section.key=value")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace):
    return load_config(args.conf_file, overrides(args.overrides))


def config_or_report(args: argparse.Namespace, command: str):
    """The config, or None after printing the one-line configuration error (exit 2)."""
    try:
        return config_from_args(args)
    except ConfigError as exc:
        print(f"deepcuts {command}: configuration error: {exc}", file=sys.stderr)
        return None


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


def run_stage(spark, cfg, name: str, pipeline_run_id: str | None = None) -> dict:
    """Run one registered stage with its context; record its manifest (also on failure)."""
    from deepcuts.core.runs import FAILED, SUCCEEDED, StageRun, rejects_of
    from deepcuts.core.storage import new_run_id
    stage = STAGES[name]
    ctx = StageRun(spark, cfg, stage, new_run_id(f"{name}-"), pipeline_run_id)
    started = time.time()
    log.info("stage %s: run %s", name, ctx.run_id)
    try:
        summary = stage.function_ref()(ctx)
        ctx.maintain()
    except BaseException as exc:
        ctx.record(FAILED, started, None, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    ctx.rejects = rejects_of(summary)
    summary = {"run_id": ctx.run_id, **summary,
               "tables": {t: str(v) for t, v in ctx.written.items()} or "none written"}
    ctx.record(SUCCEEDED, started, summary)
    print_summary(name, summary, time.time() - started)
    return summary


def main(job: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<job>.py``: exits 2 on a config error, 1 on a failed stage."""
    from deepcuts.core.storage import new_run_id
    setup_logging()
    args = parse_args(job, argv)
    try:
        cfg = config_from_args(args)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if job == "pipeline" else [job]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
    except ConfigError as exc:
        print(f"deepcuts {job}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    pipeline_run_id = new_run_id("pipeline-") if job == "pipeline" else None
    results: dict = {}
    code = EXIT_OK
    spark = None
    try:
        from deepcuts.core.spark import get_session
        spark = get_session(cfg, f"{cfg.spark.app_name}-{job}")
        spark.sparkContext.setLogLevel("WARN")
        for stage in stages:
            results[stage] = run_stage(spark, cfg, stage, pipeline_run_id)
    except ConfigError as exc:
        print(f"deepcuts {job}: configuration error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - the operator gets one line, the log the traceback
        log.error("stage failed:\n%s", traceback.format_exc())
        print(f"deepcuts {job}: stage failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        code = EXIT_FAILED
    finally:
        if spark is not None:
            spark.stop()
        if args.summary_json:
            with open(args.summary_json, "w") as fh:
                json.dump({"exit_code": code, "stages": results}, fh, indent=1, default=str)
    return code


def tables_main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepcuts tables``: every Delta table with its version, rows, files, size."""
    from deepcuts.core.lake import lake
    p = argparse.ArgumentParser(prog="deepcuts tables")
    add_config_args(p)
    p.add_argument("--files", action="store_true", help="print every data file of every table")
    args = p.parse_args(argv)
    lk = lake(config_from_args(args))
    for row in lk.describe():
        print(json.dumps(row))
        if args.files:
            for f in lk.files(row["table"]):
                print("   ", f)
    return 0


def demo_catalogue_main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepcuts demo-catalogue``: render the demo catalogue and play counts
    (``run-demo.sh`` only; never part of the nightly job).  Skipped when present."""
    from deepcuts.demo.generate import demo_data_present, generate
    setup_logging()
    p = argparse.ArgumentParser(prog="deepcuts demo-catalogue")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="render again even if present")
    args = p.parse_args(argv)
    cfg = config_or_report(args, "demo-catalogue")
    if cfg is None:
        return EXIT_CONFIG
    if demo_data_present(cfg) and not args.force:
        print(f"demo catalogue present in {cfg.demo.out_dir}: not regenerated (--force to redo)")
        return EXIT_OK
    started = time.time()
    print_summary("demo-catalogue", generate(cfg.demo), time.time() - started)
    return EXIT_OK
