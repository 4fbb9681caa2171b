"""Play events in, validated (user_id, track_id, plays) pairs and dense ALS indices out.

Input: ``factors.plays`` names a .parquet/.csv file or a folder of them, in one of two
formats (``factors.plays_format``):

* ``aggregated``: (user_id, track_id, plays); duplicate pairs are summed.
* ``events``: (user_id, track_id[, timestamp, ...]); one row is one play, counted per pair.

Ids of any type become strings, one canonical way (``canonical_id_text``): integral numbers
print as plain decimal integers (``123``, never ``123.0``), text is stripped, an empty
string is a missing id.  CSV is read as text so a malformed value survives to validation.

Every row that is not used lands in ``plays_rejects`` with one reason code (``REASONS``,
first failing check wins); the job summary counts them.  Nothing is dropped silently.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import pandas as pd

from deepcuts.core.errors import InputMissing

NULL_USER_ID = "null_user_id"
NULL_TRACK_ID = "null_track_id"
NULL_PLAYS = "null_plays"
NON_NUMERIC_PLAYS = "non_numeric_plays"
NON_FINITE_PLAYS = "non_finite_plays"      # NaN or +-infinity
NEGATIVE_PLAYS = "negative_plays"
ZERO_PLAYS = "zero_plays"
UNKNOWN_TRACK = "unknown_track"            # not in the committed `mels` (factors.unknown_tracks = "reject")
REASONS = (NULL_USER_ID, NULL_TRACK_ID, NULL_PLAYS, NON_NUMERIC_PLAYS, NON_FINITE_PLAYS,
           NEGATIVE_PLAYS, ZERO_PLAYS, UNKNOWN_TRACK)

PLAYS_EXTENSIONS = (".parquet", ".csv")
# Columns of the validated rows (text kept for the rejects table, parsed value for the fit).
VALIDATED_COLUMNS = ("user_id", "track_id", "plays_text", "plays", "reason")


# --- pure functions ------------------------------------------------------------------------
def canonical_id_text(values: pd.Series) -> pd.Series:
    """Ids as canonical strings (object dtype; None where missing).

    Integral numbers (ints, or floats holding an integer, e.g. ids that went through a
    NaN-able float column) print as decimal integers; other floats keep Python's repr;
    text is stripped of surrounding whitespace; empty text or NaN is a missing id.
    """
    def one(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, (bool, np.bool_)):
            return str(v).lower()
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        if isinstance(v, (float, np.floating)):
            return str(int(v)) if float(v).is_integer() else repr(float(v))
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        text = str(v).strip()
        return text or None
    return pd.Series([one(v) for v in values], index=values.index, dtype=object)


def parse_plays(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(value, reason) for play-count text: value is a float (NaN where rejected), reason is
    None for a usable count (finite and > 0) or one of the plays reason codes."""
    stripped = text.astype(object).where(text.notna(), None)
    stripped = pd.Series([s.strip() if isinstance(s, str) else s for s in stripped],
                         index=text.index, dtype=object)
    missing = stripped.isna() | (stripped == "")
    value = pd.to_numeric(stripped.where(~missing, None), errors="coerce").astype(float)
    literal_nan = stripped.str.lower().isin(("nan", "+nan", "-nan")).fillna(False).astype(bool)
    reason = pd.Series(None, index=text.index, dtype=object)
    reason[value.isna() & ~missing & ~literal_nan] = NON_NUMERIC_PLAYS
    reason[literal_nan | np.isinf(value.fillna(0.0))] = NON_FINITE_PLAYS
    finite = value.notna() & ~np.isinf(value.fillna(0.0))
    reason[finite & (value < 0)] = NEGATIVE_PLAYS
    reason[finite & (value == 0)] = ZERO_PLAYS
    reason[missing] = NULL_PLAYS
    return value.where(reason.isna(), np.nan), reason


def validate_rows(frame: pd.DataFrame, plays_format: str) -> pd.DataFrame:
    """Validate raw rows (user_id, track_id[, plays]) of any dtype.

    Returns ``VALIDATED_COLUMNS``: canonical ids, the plays text as read, the parsed count
    (1.0 per row for events) and ``reason`` (None when the row is usable).  Checks run in
    ``REASONS`` order and the first failing one names the row.
    """
    user = canonical_id_text(frame["user_id"])
    track = canonical_id_text(frame["track_id"])
    if plays_format == "events":
        plays_text = pd.Series(None, index=frame.index, dtype=object)
        value = pd.Series(1.0, index=frame.index)
        reason = pd.Series(None, index=frame.index, dtype=object)
    else:
        raw = frame["plays"]
        if raw.dtype.kind in "fiu":   # numeric input: a NaN there is a NaN count, not a missing one
            plays_text = raw.astype(object).map(str)
        else:
            plays_text = pd.Series([None if v is None or (isinstance(v, float) and math.isnan(v))
                                    else v.decode("utf-8", errors="replace") if isinstance(v, bytes)
                                    else str(v) for v in raw], index=frame.index, dtype=object)
        value, reason = parse_plays(plays_text)
    reason = reason.copy()
    reason[track.isna()] = NULL_TRACK_ID
    reason[user.isna()] = NULL_USER_ID
    return pd.DataFrame({"user_id": user, "track_id": track, "plays_text": plays_text,
                         "plays": value.where(reason.isna(), np.nan),
                         "reason": reason.astype(object).where(reason.notna(), None)})


def confidence_rating(plays: np.ndarray | float, epsilon: float) -> np.ndarray | float:
    """The rating fed to Spark ALS: ``log(1 + plays / epsilon)``.

    Spark's implicit ALS uses confidence ``1 + alpha * rating`` and preference
    ``rating > 0``, so this gives exactly van den Oord et al.'s (2013)
    ``c = 1 + alpha * log(1 + r / epsilon)`` with ``p = 1`` for every played pair."""
    return np.log1p(np.asarray(plays, dtype=np.float64) / epsilon)


def confidence(plays: np.ndarray | float, alpha: float, epsilon: float) -> np.ndarray | float:
    """The paper's confidence ``1 + alpha * log(1 + r / epsilon)`` (what ALS ends up weighting)."""
    return 1.0 + alpha * confidence_rating(plays, epsilon)


def rating_column(plays_col, epsilon: float):
    """Spark's twin of :func:`confidence_rating`: ``log(1 + plays / epsilon)`` (the rating
    Spark ALS turns into the confidence ``1 + alpha * rating``)."""
    from pyspark.sql import functions as F
    return F.log1p(plays_col / F.lit(float(epsilon)))


def list_plays_files(path: str) -> list[str]:
    """The .parquet/.csv files at ``path`` (a file, or a folder searched recursively)."""
    import pyarrow.fs as pafs
    if "://" in path:
        fs, base = pafs.FileSystem.from_uri(path)
        scheme = path.split("://", 1)[0]
        to_uri = (lambda p: f"{scheme}://{p}")
    else:
        fs, base = pafs.LocalFileSystem(), os.path.abspath(path)
        to_uri = (lambda p: "file://" + p)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise InputMissing(f"factors.plays: {path} does not exist")
    if info.type == pafs.FileType.File:
        found = [info]
    else:
        found = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                 if i.type == pafs.FileType.File]
    files = sorted(to_uri(i.path) for i in found
                   if i.path.lower().endswith(PLAYS_EXTENSIONS)
                   and not os.path.basename(i.path).startswith(("_", ".")))
    if not files:
        raise InputMissing(f"factors.plays: no {'/'.join(PLAYS_EXTENSIONS)} files at {path}")
    return files


# --- Spark wiring --------------------------------------------------------------------------
def _required_columns(plays_format: str) -> tuple[str, ...]:
    return ("user_id", "track_id") if plays_format == "events" else ("user_id", "track_id", "plays")


def read_raw_plays(spark, path: str, plays_format: str):
    """The raw rows as a DataFrame of the required columns, every value as text.

    Parquet columns are cast to text here (integral doubles as integers, see
    ``canonical_id_text``); CSV is read as text with a header, so nothing is coerced away."""
    from pyspark.sql import functions as F
    files = list_plays_files(path)
    needed = _required_columns(plays_format)
    frames = []
    for kind in PLAYS_EXTENSIONS:
        group = [f for f in files if f.lower().endswith(kind)]
        if not group:
            continue
        if kind == ".csv":
            df = (spark.read.option("header", True).option("inferSchema", False)
                  .option("mode", "PERMISSIVE").csv(group))
        else:
            df = spark.read.parquet(*group)
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ValueError(f"factors.plays ({plays_format} format): {kind} files at {path} lack "
                             f"columns {missing}; found {df.columns}")
        cols = []
        for name in needed:
            dtype = df.schema[name].dataType.typeName()
            col = F.col(name)
            if dtype in ("float", "double") and name != "plays":
                col = F.when(F.isnan(col), None).when(col == F.floor(col), col.cast("long").cast("string")) \
                    .otherwise(col.cast("string"))
            cols.append(col.cast("string").alias(name))
        frames.append(df.select(*cols))
    out = frames[0]
    for other in frames[1:]:
        out = out.unionByName(other)
    return out


def validate_plays(raw_df, plays_format: str):
    """``validate_rows`` over the raw rows, streamed per partition (mapInPandas)."""
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType
    schema = StructType([StructField("user_id", StringType()), StructField("track_id", StringType()),
                         StructField("plays_text", StringType()), StructField("plays", DoubleType()),
                         StructField("reason", StringType())])

    def validate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from deepcuts.core.spark import python_worker_setup
        python_worker_setup()
        for batch in batches:
            yield validate_rows(batch, plays_format)

    return raw_df.mapInPandas(validate, schema)


def flag_unknown_tracks(validated_df, known_track_ids_df):
    """Mark usable rows whose track is not in ``known_track_ids_df`` (track_id) as unknown."""
    from pyspark.sql import functions as F
    known = known_track_ids_df.select("track_id").distinct().withColumn("_known", F.lit(True))
    joined = validated_df.join(known, "track_id", "left")
    reason = F.when(F.col("reason").isNull() & F.col("_known").isNull(), F.lit(UNKNOWN_TRACK)) \
        .otherwise(F.col("reason"))
    return joined.select("user_id", "track_id", "plays_text",
                         F.when(reason.isNull(), F.col("plays")).alias("plays"), reason.alias("reason"))


def aggregate_pairs(usable_df):
    """(user_id, track_id, plays): the sum over rows of each pair (events count 1 each)."""
    from pyspark.sql import functions as F
    return usable_df.groupBy("user_id", "track_id").agg(F.sum("plays").alias("plays"))


def dense_index(ids_df, id_col: str, idx_col: str):
    """Distinct ids -> 0..n-1 (int), ordered by id within partitions, without a single-partition
    window: count each partition, offset it by the counts before it.  Returns a persisted frame
    (id_col, idx_col); call ``.unpersist()`` when done."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    spark = ids_df.sparkSession
    distinct = ids_df.select(id_col).distinct().withColumn("_part", F.spark_partition_id()).persist()
    counts = sorted((r["_part"], r["count"]) for r in distinct.groupBy("_part").count().collect())
    total = sum(c for _, c in counts)
    if total >= 2 ** 31:
        raise ValueError(f"{total} distinct {id_col}s: Spark ALS needs int32 indices")
    offsets, running = [], 0
    for part, count in counts:
        offsets.append((part, running))
        running += count
    offsets_df = spark.createDataFrame(offsets or [(0, 0)], "_part int, _offset long")
    ordered = Window.partitionBy("_part").orderBy(id_col)
    index = (distinct.join(F.broadcast(offsets_df), "_part")
             .select(id_col, (F.row_number().over(ordered) - 1 + F.col("_offset")).cast("int").alias(idx_col))
             .persist())
    index.count()
    distinct.unpersist()
    return index
