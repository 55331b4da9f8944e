"""`apr-ray run` (the README's main command) on a shrunken tiny preset: the data stage writes its
datasets, a second run reuses them, and a run with other data settings is refused, naming the folder."""

import pyarrow.parquet as pq
import pytest

from apr_ray.cli import main

SMALL = ["--set", "data.train_problems=40", "--set", "data.val_problems=10", "--set", "data.test_problems=10",
         "--no-progress"]


@pytest.fixture
def fresh_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.ray
def test_run_writes_reuses_and_refuses_stale_data(tmp_path, fresh_ray, capsys):
    out = ["--set", f"output_dir={tmp_path / 'run'}"]
    assert main(["run", *out, *SMALL]) == 0
    data = tmp_path / "run" / "data"
    problems = pq.read_table(data / "problems")
    assert sorted(problems["split"].to_pylist()).count("train") == 40 and problems.num_rows == 60
    assert pq.read_table(data / "demos-apr").num_rows >= 40  # one row per thread request, >= 1 per problem
    assert (tmp_path / "run" / "config.yaml").is_file()

    assert main(["run", *out, *SMALL]) == 0
    assert "reusing" in capsys.readouterr().out

    assert main(["run", *out, *SMALL, "--set", "data.train_problems=41"]) == 2
    err = capsys.readouterr().err
    assert "other data settings" in err and str(data) in err


def test_run_rejects_a_config_typo_before_starting_anything(capsys):
    assert main(["run", "--set", "data.trian_problems=5"]) == 2
    assert "did you mean 'train_problems'" in capsys.readouterr().err
