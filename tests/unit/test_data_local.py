"""The no-Ray writers (`generate_problem_data_local`, `generate_demos_local`): their rows equal the pure
functions' output and do not depend on the number of worker processes, bad arguments fail before the
output directory is touched, a worker's error reaches the caller, and nothing on the path imports Ray
(checked in a subprocess where importing Ray is recorded and fails). The Ray comparison lives in
tests/ray/test_data_local_vs_ray.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apr_ray.countdown.problems import SPLITS, ProblemConfig, ProblemSpaceExhausted
from apr_ray.data import (
    DEMOS_SCHEMA,
    PROBLEMS_SCHEMA,
    DemoFormat,
    DemosConfig,
    DemoWorker,
    TextEncoder,
    demos_schema,
    generate_demos_local,
    generate_problem_data_local,
    parquet_files,
    plan_problems,
    problems_for_target,
    read_demo_rows,
    read_problems_table,
)
from apr_ray.tokenizer import build_tokenizer

SIZES = {"train": 30, "val": 10, "test": 10}
PROBLEM = ProblemConfig(num_operands=3)
SEED = 5
DEMOS = DemosConfig(kind="apr", seed=3, batch_problems=8)
REPO = Path(__file__).resolve().parents[2]


def problem_keys(path: Path) -> set[tuple]:
    table = pq.read_table(path, schema=PROBLEMS_SCHEMA)
    return {(r["problem_id"], r["split"], r["index"], r["target"], tuple(r["nums"])) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """The same problems written in this process and by two worker processes."""
    root = tmp_path_factory.mktemp("problems")
    return {w: generate_problem_data_local(root / f"w{w}", SIZES, seed=SEED, problem=PROBLEM, workers=w)
            for w in (1, 2)}


@pytest.fixture(scope="module")
def demos(problems, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    return {w: generate_demos_local(problems[1].path, root / f"w{w}", config=DEMOS, tokenizer=tokenizer, workers=w)
            for w in (1, 2)}


def test_local_problems_equal_the_pure_generator_for_any_worker_count(problems):
    plan = plan_problems(PROBLEM, SIZES, SEED)
    expected = {(p.problem_id, split, index, p.target, p.nums)
                for row in plan for split, index, p in problems_for_target(PROBLEM, row["target"], row, SEED)}
    assert len(expected) == sum(SIZES.values())
    for workers, summary in problems.items():
        assert summary.counts == SIZES
        files = parquet_files(summary.path)
        # one file per block of targets: min(targets, 4 * workers)
        assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(min(len(plan), 4 * workers))]
        assert all(pq.read_schema(f).equals(PROBLEMS_SCHEMA) for f in files)
        assert problem_keys(Path(summary.path)) == expected
    for split in SPLITS:  # indices are the canonical order: 0..n-1 per split
        assert read_problems_table(problems[2].path, split)["index"].to_pylist() == list(range(SIZES[split]))


def test_local_demos_equal_the_in_process_worker_for_any_worker_count(problems, demos, tokenizer):
    train = read_problems_table(problems[1].path, "train")
    expected = DemoWorker(DEMOS, TextEncoder.from_tokenizer(tokenizer))(train)
    expected_rows = sorted(expected.to_pylist(), key=lambda r: (r["demo_id"], r["thread_id"], r["segment"]))
    rows = {w: read_demo_rows(s.path) for w, s in demos.items()}
    assert rows[1] == rows[2] == expected_rows
    assert {r["demo_id"] for r in rows[1]} == {f"apr/{pid}" for pid in train["problem_id"].to_pylist()}
    for summary in demos.values():
        files = parquet_files(summary.path)
        assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(4)]  # ceil(30 / 8) batches
        assert all(pq.read_schema(f).equals(DEMOS_SCHEMA) for f in files)
        assert summary.kind == "apr" and summary.demos == SIZES["train"] and summary.sequences == len(expected_rows)
        assert summary.completion_tokens == sum(len(r["completion_ids"]) for r in expected_rows)
    assert {k: v for k, v in vars(demos[1]).items() if k not in ("path", "seconds")} == \
        {k: v for k, v in vars(demos[2]).items() if k not in ("path", "seconds")}


def test_local_demos_limit_text_columns_and_sosp(problems, tokenizer, tmp_path):
    config = DemosConfig(kind="sosp", seed=1, batch_problems=2, format=DemoFormat(include_text=True))
    summary = generate_demos_local(problems[1].path, tmp_path / "d", split="val", config=config, tokenizer=tokenizer,
                                   limit=3, progress=True)
    files = parquet_files(summary.path)
    assert len(files) == 2 and all(pq.read_schema(f).equals(demos_schema(True)) for f in files)
    rows = read_demo_rows(summary.path)
    first = read_problems_table(problems[1].path, "val", limit=3)["problem_id"].to_pylist()
    assert sorted(r["demo_id"] for r in rows) == sorted(f"sosp/{pid}" for pid in first)  # SoS+: one row per demo
    assert all(tokenizer.decode(r["completion_ids"]) == r["completion"] for r in rows)


def test_non_empty_output_needs_overwrite_and_bad_arguments_leave_it_alone(problems, tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_problem_data_local(out, SIZES, seed=SEED, problem=PROBLEM)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_demos_local(problems[1].path, out, config=DEMOS, tokenizer=tokenizer)
    bad_problem_calls = [
        (dict(sizes=SIZES, workers=0), "workers must be >= 1"),
        (dict(sizes={"dev": 3}), "unknown split name"),
        (dict(sizes={"train": -1}), "negative"),
        (dict(sizes={"train": 0}), "no problems requested"),
    ]
    for kwargs, words in bad_problem_calls:
        with pytest.raises(ValueError, match=words):
            generate_problem_data_local(out, seed=SEED, problem=PROBLEM, overwrite=True, **kwargs)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        generate_demos_local(problems[1].path, out, tokenizer=tokenizer, workers=0, overwrite=True)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_demos_local(problems[1].path, out, split="dev", tokenizer=tokenizer, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        generate_demos_local(tmp_path / "missing", out, tokenizer=tokenizer, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    summary = generate_problem_data_local(out, {"val": 4}, seed=SEED, problem=PROBLEM, overwrite=True)
    assert summary.counts == {"val": 4} and not (out / "keep.txt").exists()
    assert all(p.name.startswith("part-") for p in out.iterdir())


def test_a_worker_error_reaches_the_caller(tmp_path):
    # Numbers 1..2 cannot reach 10 or 11: each of the two targets (two blocks, two processes) gives up.
    hopeless = ProblemConfig(num_operands=3, num_min=1, num_max=2, target_min=10, target_max=11)
    with pytest.raises(ProblemSpaceExhausted, match="no new solvable numbers"):
        generate_problem_data_local(tmp_path / "p", {"train": 20}, seed=0, problem=hopeless, workers=2)


# Stands in for Ray on the import path of the subprocess and of the workers it spawns (they inherit
# PYTHONPATH, not sys.modules): an import, even one caught, leaves a line in the marker file.
FAKE_RAY = """import os
with open(os.environ["APR_TEST_RAY_MARKER"], "a") as f:
    f.write(f"ray imported by process {os.getpid()}\\n")
raise ImportError("ray is not available in this test")
"""

NO_RAY_SCRIPT = """
import json, sys
from apr_ray.countdown.problems import ProblemConfig
from apr_ray.data import DemosConfig, generate_demos_local, generate_problem_data_local

out = sys.argv[1]
p = generate_problem_data_local(out + "/p", {"train": 6, "val": 2}, seed=1, problem=ProblemConfig(num_operands=3))
d = generate_demos_local(p.path, out + "/d", config=DemosConfig(batch_problems=3), workers=2)
print(json.dumps({"counts": p.counts, "demos": d.demos, "ray_loaded": "ray" in sys.modules}))
"""


def test_local_writers_never_import_ray(tmp_path):
    fake = tmp_path / "fake_site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_RAY)
    marker = tmp_path / "ray_imports.txt"
    env = {**os.environ, "APR_TEST_RAY_MARKER": str(marker), "PYTHONPATH": os.pathsep.join(
        [str(fake.parent), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    done = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT, str(tmp_path / "out")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists(), marker.read_text()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"counts": {"train": 6, "val": 2}, "demos": 6, "ray_loaded": False}
