"""knn.shards: shard and block counts from conf or from the catalogue size and cores."""
from __future__ import annotations

from deepcuts.knn.shards import plan, plan_from_conf


def test_derived_shards_follow_the_catalogue_size():
    assert plan(320, 320, 2).shards == 1
    assert plan(999_999, 10, 2).shards == 1
    assert plan(1_000_001, 10, 2).shards == 2
    assert plan(10_000_000, 10, 16).shards == 10


def test_derived_blocks_fill_the_cores_and_bound_the_block():
    p = plan(200_000, 200_000, 2, block_rows=20_000)
    assert (p.shards, p.blocks) == (1, 10)
    assert plan(320, 320, 8).blocks == 16          # 2 tasks per core when blocks are tiny
    p = plan(10_000_000, 10_000_000, 64)
    assert p.blocks == 500 and p.pairs == 5000
    assert plan(100, 3, 8).blocks == 3             # never more blocks than queries


def test_conf_values_win_but_stay_sane():
    assert plan(1000, 1000, 2, shards=7, blocks=3) == plan(1000, 1000, 64, shards=7, blocks=3)
    assert plan(1000, 1000, 2, shards=7, blocks=3).pairs == 21
    assert plan(5, 5, 2, shards=7).shards == 5     # never more shards than items
    assert plan(0, 0, 2) .pairs == 1


def test_plan_from_conf_reads_the_neighbours_section():
    from deepcuts.core.config import load_config
    nc = load_config().neighbours
    got = plan_from_conf(nc, 2_000_000, 2_000_000, 4)
    assert got == plan(2_000_000, 2_000_000, 4, shards=nc.shards, shard_rows=nc.shard_rows,
                       blocks=nc.blocks, block_rows=nc.block_rows, tasks_per_core=nc.tasks_per_core)
