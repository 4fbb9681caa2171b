"""Command-line wiring shared by the jobs: arguments, config, logging, the run summary.

Every stage is registered in :mod:`deepcuts.core.registry` with the tables it reads and
writes; ``jobs/<stage>.py`` is just ``main("<stage>")``.  The ``pipeline`` job runs the
nightly sequence in one Spark application.  Each stage run gets a :class:`StageRun`
context and leaves a manifest row in the ``runs`` table.

Exit codes: 0 ok, 1 a stage failed, 2 configuration error, 3 input missing or empty,
4 a quality gate failed (see ``main``).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import traceback
from typing import Sequence

from deepcuts.core.config import ConfigError, load_config, to_dict
from deepcuts.core.storage import s3_credentials_missing
from deepcuts.core.errors import GATE_OUTCOME
from deepcuts.core.registry import NIGHTLY, STAGES

log = logging.getLogger("deepcuts")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INPUT, EXIT_GATE = 0, 1, 2, 3, 4


def parse_args(job: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"spark-submit.sh {job}",
                                description=f"deepcuts {job} job (defaults: conf/deepcuts.toml)")
    add_config_args(p)
    p.add_argument("--stages", default=",".join(NIGHTLY),
                   help="pipeline / nightly: comma-separated stages to run, in order")
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


def run_stage(spark, cfg, name: str, pipeline_run_id: str | None = None, skip_unchanged: bool = False) -> dict:
    """Run one registered stage with its context; record its manifest (also on failure).
    ``skip_unchanged`` (the nightly job): a skippable stage whose inputs are those of its last
    succeeded run is not run, and its summary says so."""
    from deepcuts.core.runs import FAILED, SKIPPED, SUCCEEDED, StageRun, rejects_of
    from deepcuts.core.storage import new_run_id
    stage = STAGES[name]
    ctx = StageRun(spark, cfg, stage, new_run_id(f"{name}-"), pipeline_run_id)
    started = time.time()
    log.info("stage %s: run %s", name, ctx.run_id)
    try:
        fingerprint = stage.fingerprint(cfg, ctx.lake) if stage.fingerprint else None
        unchanged = ctx.unchanged_reason(fingerprint) if skip_unchanged and stage.skippable else None
        if unchanged:
            summary = {"skipped": unchanged}
        else:
            from deepcuts.core.spark import arrow_batches
            with arrow_batches(spark, cfg, stage.rows):
                summary = stage.function_ref()(ctx)
            ctx.maintain()
    except BaseException as exc:
        # The row says which outcome it was (the exit code's words), then the exception.
        detail = str(exc)
        line = f"{OUTCOME_WORDS[exit_code_of(exc)]}: {one_line(exc)}"
        ctx.record(FAILED, started, None, error=(line + (f"\n{detail}" if detail not in line else ""))[:2000])
        raise
    ctx.rejects = rejects_of(summary)
    summary = {"run_id": ctx.run_id, **summary,
               "tables": {t: str(v) for t, v in ctx.written.items()} or "none written"}
    if fingerprint:
        summary["input_fingerprint"] = fingerprint
    # A stage with nothing to do here says why in summary["skipped"] (a string) and writes nothing.
    skipped = isinstance(summary.get("skipped"), str) and not ctx.written
    ctx.record(SKIPPED if skipped else SUCCEEDED, started, summary)
    print_summary(name, summary, time.time() - started)
    return summary


def exit_code_of(exc: BaseException) -> int:
    from deepcuts.core.errors import GateFailed, InputMissing
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, InputMissing):
        return EXIT_INPUT
    if isinstance(exc, GateFailed):
        return EXIT_GATE
    return EXIT_FAILED


OUTCOME_WORDS = {EXIT_CONFIG: "configuration error", EXIT_INPUT: "input missing", EXIT_GATE: GATE_OUTCOME,
                 EXIT_FAILED: "stage failed"}


# "Job aborted due to stage failure: Task 1 in stage 3.0 failed 4 times, most recent failure: Lost
# task 1.3 in stage 3.0 (TID 9) (10.0.0.5 executor 2): org.apache.spark.SparkException: <cause>"
_ABORTED = re.compile(r"Job aborted due to stage failure: (Task \S+ in stage \S+ failed \d+ times), most recent "
                      r"failure: Lost task \S+ in stage \S+ \(TID \d+\) \(.*? executor (\S+)\): (.*)")

_WORKER_CRASHED = re.compile(r"Python worker exited unexpectedly \(crashed\)")


def one_line(exc: BaseException) -> str:
    """The operator's line for a failure.  Spark's errors are unwrapped: a failed task says which
    task, how often and why (a dead Python worker, the exception a task raised), not "An error
    occurred while calling o47.save" or the first line of a Java stack."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    name = type(exc).__name__
    if name == "PythonException" and lines:            # a task's Python exception: its last line
        return f"a Spark task raised {lines[-1]}"
    if name == "Py4JJavaError":
        aborted = _ABORTED.search(text)
        if aborted:
            task, executor, cause = aborted.groups()
            cause = re.sub(r"^(?:[\w$]+\.)+[\w$]+(?:Exception|Error): ", "", cause.strip())
            crashed = _WORKER_CRASHED.search(text)   # often wrapped ("Task failed while writing rows")
            if crashed:
                cause = f"{crashed.group(0)}: a Python worker died (see that executor's stderr)"
            return f"Spark job aborted: {task} (last on executor {executor}): {cause}"
        java = next((line[1:].strip() for line in lines if line.startswith(":")), None)
        if java:
            return f"Spark: {java}"
    return f"{name}: {lines[0] if lines else ''}"


def print_run_table(job: str, outcomes: dict, gates: list[str], code: int) -> None:
    """The operator's overview: one line per stage, then the gates and the exit code."""
    print(f"\n=== deepcuts {job}: exit {code} ({'ok' if code == EXIT_OK else OUTCOME_WORDS[code]})")
    for name, o in outcomes.items():
        print(f"  {name:<11} {o['status']:<12} {o['seconds']:>8.1f} s  {o.get('note', '')}")
    for line in gates:
        print(f"  GATE FAILED {line}")
    sys.stdout.flush()


def stage_note(summary: dict) -> str:
    """A few counts of a stage's summary for its line in the run table."""
    if isinstance(summary.get("skipped"), str):
        return summary["skipped"]
    parts = []
    for key in ("ingested", "pairs", "epochs_run", "scored", "serving_rows", "tracks", "report"):
        if key in summary and not isinstance(summary[key], dict):
            parts.append(f"{key}={summary[key]}")
    promotion = summary.get("promotion")
    if isinstance(promotion, dict):
        parts.append(f"model {promotion.get('decision')}")
    rejected = summary.get("rejected") or summary.get("rejected_rows")
    if isinstance(rejected, dict) and rejected:
        parts.append(f"rejected={sum(v for v in rejected.values() if isinstance(v, (int, float)))}")
    return ", ".join(parts)


def main(job: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<job>.py``.  ``pipeline`` runs ``--stages`` in order; ``nightly``
    is the operator's job: the same order, stages with unchanged inputs skipped, quality
    gates applied.  Exit codes (the README's table): 0 ok, 1 a stage failed, 2 configuration
    error, 3 input missing or empty, 4 a quality gate failed."""
    from deepcuts.core.gates import failed_gates
    from deepcuts.core.storage import new_run_id
    setup_logging()
    args = parse_args(job, argv)
    sequence = job in ("pipeline", "nightly")
    try:
        cfg = config_from_args(args)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if sequence else [job]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")
        unreachable = s3_credentials_missing(to_dict(cfg))
        if unreachable:
            raise ConfigError(unreachable)
    except ConfigError as exc:
        print(f"deepcuts {job}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    pipeline_run_id = new_run_id(f"{job}-") if sequence else None
    results: dict = {}
    outcomes: dict = {}
    gates: list[str] = []
    code = EXIT_OK
    spark = None
    try:
        from deepcuts.core.spark import get_session
        spark = get_session(cfg, f"{cfg.spark.app_name}-{job}")
        spark.sparkContext.setLogLevel("WARN")
        for stage in stages:
            started = time.time()
            try:
                results[stage] = summary = run_stage(spark, cfg, stage, pipeline_run_id,
                                                     skip_unchanged=job == "nightly" and cfg.nightly.skip_unchanged)
            except Exception as exc:  # noqa: BLE001 - the operator gets one line, the log the traceback
                stage_code = exit_code_of(exc)
                if stage_code == EXIT_FAILED:
                    log.error("stage %s failed:\n%s", stage, traceback.format_exc())
                results[stage] = {"error": one_line(exc)}
                outcomes[stage] = {"status": OUTCOME_WORDS[stage_code], "seconds": time.time() - started,
                                   "note": one_line(exc)[:200]}
                print(f"deepcuts {job}: {stage}: {OUTCOME_WORDS[stage_code]}: {one_line(exc)}", file=sys.stderr)
                if stage_code == EXIT_GATE:
                    # Nothing of that stage was published; the later stages still run on the last
                    # consistent tables (the report shows the failure).
                    gates.append(f"{stage}: {one_line(exc)}")
                    continue
                code = stage_code
                break
            # The summary-level gates (reject rate, promotion) are the nightly job's: a stage run
            # by hand reports its rejects and exits 0.
            stage_gates = failed_gates(stage, summary, cfg.nightly.max_reject_rate) if job == "nightly" else []
            gates += stage_gates
            outcomes[stage] = {"status": ("skipped" if isinstance(summary.get("skipped"), str)
                                          else "gate failed" if stage_gates else "ok"),
                               "seconds": time.time() - started, "note": stage_note(summary)}
        if code == EXIT_OK and gates:
            code = EXIT_GATE
        if job == "nightly" and code in (EXIT_OK, EXIT_GATE):
            from deepcuts.core import retention
            from deepcuts.core.lake import lake
            started = time.time()
            results["retention"] = kept = retention.apply(cfg, lake(cfg))
            outcomes["retention"] = {"status": "ok", "seconds": time.time() - started,
                                     "note": ", ".join(f"{k}={v}" for k, v in kept.items())}
    finally:
        if spark is not None:
            spark.stop()
        if sequence:
            print_run_table(job, outcomes, gates, code)
        if args.summary_json:
            with open(args.summary_json, "w") as fh:
                json.dump({"exit_code": code, "pipeline_run_id": pipeline_run_id, "stages": results,
                           "outcomes": outcomes, "gates_failed": gates}, fh, indent=1, default=str)
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
