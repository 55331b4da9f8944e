"""The no-Ray writers give the same datasets as the Ray Data pipelines: the same problems (split, index,
numbers) and the same demonstration rows in the same row groups, in the same order (the files differ)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from apr_ray.countdown.problems import ProblemConfig
from apr_ray.data import (
    PROBLEMS_SCHEMA,
    DemosConfig,
    generate_demos,
    generate_demos_local,
    generate_problem_data,
    generate_problem_data_local,
    read_demo_rows,
)
from apr_ray.tokenizer import build_tokenizer

pytestmark = pytest.mark.ray

SIZES = {"train": 60, "val": 20, "test": 20}
PROBLEM = ProblemConfig(num_operands=3)


def row_groups(path) -> list[list[dict]]:
    from apr_ray.data import _row_groups

    return [pq.ParquetFile(file).read_row_group(index).to_pylist() for file, index, _ in _row_groups(path)]


def problem_rows(path) -> set[tuple]:
    table = pq.read_table(path, schema=PROBLEMS_SCHEMA)
    return {(r["split"], r["index"], r["problem_id"], r["target"], tuple(r["nums"])) for r in table.to_pylist()}


def test_local_writers_equal_the_ray_pipelines(ray_cluster, tmp_path):
    ray_problems = generate_problem_data(tmp_path / "ray_p", SIZES, seed=11, problem=PROBLEM, workers=2,
                                         progress=False)
    local_problems = generate_problem_data_local(tmp_path / "local_p", SIZES, seed=11, problem=PROBLEM, workers=2)
    assert ray_problems.counts == local_problems.counts == SIZES
    rows = problem_rows(ray_problems.path)
    assert len(rows) == sum(SIZES.values()) and problem_rows(local_problems.path) == rows

    tokenizer = build_tokenizer()
    config = DemosConfig(kind="apr", seed=4, batch_problems=7)
    ray_demos = generate_demos(ray_problems.path, tmp_path / "ray_d", config=config, tokenizer=tokenizer, limit=24,
                               workers=2, progress=False)
    local_demos = generate_demos_local(local_problems.path, tmp_path / "local_d", config=config, tokenizer=tokenizer,
                                       limit=24)
    ray_rows, local_rows = read_demo_rows(ray_demos.path), read_demo_rows(local_demos.path)
    assert len({r["demo_id"] for r in ray_rows}) == 24 and ray_demos.sequences == len(ray_rows) > 24
    assert local_rows == ray_rows  # every column, rows ordered by (demo_id, thread_id, segment)
    # the same row groups in the same order, so SFT, which reads row groups in a seeded order, trains the same
    # batches on either writer's data (24 problems: row groups of 7, 7, 7 and 3)
    assert row_groups(ray_demos.path) == row_groups(local_demos.path) and len(row_groups(local_demos.path)) == 4
    for name in ("kind", "demos", "sequences", "threads", "solved", "spawns", "prompt_tokens", "completion_tokens",
                 "max_sequence_tokens"):
        assert getattr(local_demos, name) == getattr(ray_demos, name), name
