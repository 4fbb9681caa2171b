"""Play events in, validated (user_id, track_id, plays) pairs and dense ALS indices out.

Input: ``factors.plays`` names a .parquet/.csv file or a folder of them, in one of two
formats (``factors.plays_format``):

* ``aggregated``: (user_id, track_id, plays); duplicate pairs are summed.
* ``events``: (user_id, track_id[, timestamp, ...]); one row is one play, counted per pair.

Ids of any type become strings, one canonical way (``read_raw_plays``, ``stripped_text``):
integral numbers print as plain decimal integers (``123``, never ``123.0``), other numbers as
Spark casts them to text, text is stripped of white space, an empty string is a missing id.
CSV is read as text so a malformed value survives to validation, which is Spark SQL
(``validate_plays``): no Python runs per play row.

Every row that is not used lands in ``plays_rejects`` with one reason code (``REASONS``,
first failing check wins); the job summary counts them.  Nothing is dropped silently.
"""
from __future__ import annotations

import os

import numpy as np

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


# --- the rules, as Spark SQL columns --------------------------------------------------------
# Validation runs as SQL expressions on the JVM, not Python: a play table of 10^10 rows must
# not pay a Python round trip per Arrow batch.
# What ``str.strip()`` strips: ASCII and Unicode white space and separators.
_SPACE = r"[\s\p{Z}\x1c-\x1f\x85]"
_DECIMAL = r"^[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$"   # Java's parser alone also takes "1d", "0x1p3"
_NOT_A_NUMBER = r"^[+-]?(nan|inf|infinity)$"                         # lower-cased


def stripped_text(col):
    """``col`` as text without surrounding white space; empty text is null (a missing id)."""
    from pyspark.sql import functions as F
    text = F.regexp_replace(col.cast("string"), f"^{_SPACE}+|{_SPACE}+$", "")
    return F.when(text != "", text)


def plays_reason(text):
    """The plays reason code of play-count text (null: a usable count, finite and > 0)."""
    from pyspark.sql import functions as F
    t = stripped_text(text)
    value = t.cast("double")
    return (F.when(t.isNull(), F.lit(NULL_PLAYS))
            .when(F.lower(t).rlike(_NOT_A_NUMBER), F.lit(NON_FINITE_PLAYS))
            .when(~t.rlike(_DECIMAL), F.lit(NON_NUMERIC_PLAYS))
            .when(F.abs(value) == float("inf"), F.lit(NON_FINITE_PLAYS))      # e.g. 1e999
            .when(value < 0, F.lit(NEGATIVE_PLAYS))
            .when(value == 0, F.lit(ZERO_PLAYS)))


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
    """The raw rows (text columns, see ``read_raw_plays``) as ``VALIDATED_COLUMNS``:
    canonical ids, the plays text as read, the parsed count (1.0 per row for events) and
    ``reason`` (null when the row is usable).  Checks run in ``REASONS`` order and the
    first failing one names the row; a rejected row carries no count."""
    from pyspark.sql import functions as F
    user, track = stripped_text(F.col("user_id")), stripped_text(F.col("track_id"))
    if plays_format == "events":
        text, count, count_reason = F.lit(None).cast("string"), F.lit(1.0), F.lit(None).cast("string")
    else:
        text = F.col("plays").cast("string")
        count, count_reason = stripped_text(text).cast("double"), plays_reason(text)
    reason = (F.when(user.isNull(), F.lit(NULL_USER_ID)).when(track.isNull(), F.lit(NULL_TRACK_ID))
              .otherwise(count_reason))
    return raw_df.select(user.alias("user_id"), track.alias("track_id"), text.alias("plays_text"),
                         count.alias("_count"), reason.alias("reason")) \
        .select("user_id", "track_id", "plays_text",
                F.when(F.col("reason").isNull(), F.col("_count")).cast("double").alias("plays"), "reason")


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
