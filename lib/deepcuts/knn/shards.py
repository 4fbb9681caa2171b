"""How the catalogue is cut into shards and the queries into blocks.

A (block x shard) pair is one Spark task: it holds one shard's index and one block of
queries, nothing more.  Sizes come from ``neighbours.shards`` / ``neighbours.blocks`` when
set, else they are derived:

* shards S = ceil(items / shard_rows): a shard's flat index is shard_rows x dim x 4 bytes
  (1e6 x 64 x 4 = 256 MB), what one executor core holds comfortably;
* blocks B = max(ceil(queries / block_rows), ceil(tasks_per_core x cores / S)): enough
  pairs to keep every core busy with a short last wave, and a block small enough that the
  per-block merge (block_rows x S x (k + 1) candidates) stays in memory.

Assignment is a stable hash of the id (xxhash64 with a salt), so a track is in the same
shard every run on the same S, and shards are uneven by a few percent (which the merge
does not care about).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Salts of the three hash assignments: independent of each other.
SHARD_SALT = "deepcuts-knn-shard"
BLOCK_SALT = "deepcuts-knn-block"
SAMPLE_SALT = "deepcuts-knn-recall-sample"
# A hash sample resolves fractions to 1 / SAMPLE_BUCKETS.
SAMPLE_BUCKETS = 1 << 20


@dataclass(frozen=True)
class Plan:
    shards: int
    blocks: int

    @property
    def pairs(self) -> int:
        return self.shards * self.blocks


def plan(n_items: int, n_queries: int, cores: int, *, shards: int = 0, shard_rows: int = 1_000_000,
         blocks: int = 0, block_rows: int = 20_000, tasks_per_core: int = 2) -> Plan:
    """Shard and block counts (see the module docstring); conf values > 0 win."""
    if shards <= 0:
        shards = max(1, math.ceil(n_items / max(1, shard_rows)))
    shards = max(1, min(shards, max(1, n_items)))
    if blocks <= 0:
        blocks = max(math.ceil(n_queries / max(1, block_rows)),
                     math.ceil(tasks_per_core * max(1, cores) / shards))
    blocks = max(1, min(blocks, max(1, n_queries)))
    return Plan(shards, blocks)


def plan_from_conf(nc, n_items: int, n_queries: int, cores: int) -> Plan:
    return plan(n_items, n_queries, cores, shards=nc.shards, shard_rows=nc.shard_rows,
                blocks=nc.blocks, block_rows=nc.block_rows, tasks_per_core=nc.tasks_per_core)


def bucket_expr(col, n: int, salt: str):
    """Spark: a stable bucket 0..n-1 of ``col`` (a string id)."""
    from pyspark.sql import functions as F
    return F.pmod(F.xxhash64(F.lit(salt), col), F.lit(n)).cast("int")


def shard_expr(col, n: int):
    return bucket_expr(col, n, SHARD_SALT)


def block_expr(col, n: int):
    return bucket_expr(col, n, BLOCK_SALT)


def sample_expr(col, fraction: float):
    """Spark: True for a stable ``fraction`` of ids (the recall sample)."""
    from pyspark.sql import functions as F
    if fraction <= 0:
        return F.lit(False)
    if fraction >= 1:
        return F.lit(True)
    return bucket_expr(col, SAMPLE_BUCKETS, SAMPLE_SALT) < F.lit(int(round(fraction * SAMPLE_BUCKETS)))
