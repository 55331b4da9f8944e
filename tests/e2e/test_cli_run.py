"""`apr-ray run` (the README's main command) end to end on a shrunken tiny preset, as a user runs it: one
subprocess does data → SFT → GRPO (vLLM generator pool) → test evaluation, then everything is read back
from the MLflow database it wrote: the pipeline run and its stage runs, the config as params, the metric
histories at the right steps, the artifacts (config, trees as JSON and HTML, ladder plot, summary, model).

Also: data written with other data settings is refused (naming the folder), and the user-fixable errors
(config typo, missing problems dataset, no trained model) exit 2 with one clear line before anything starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apr_ray.cli import main

SFT_STEPS, SFT_EVAL_EVERY = 6, 3
GRPO_STEPS = 2
EVAL_PROBLEMS, SAMPLE_TREES = 4, 2
DATA = {"data.train_problems": 100, "data.val_problems": 10, "data.test_problems": 10}
# Short trees keep rollouts and evaluations to seconds: the vLLM engine start dominates the run.
OVERRIDES = DATA | {
    "data.problems.num_operands": 3,
    "sft.steps": SFT_STEPS, "sft.eval_every": SFT_EVAL_EVERY, "sft.log_every": SFT_EVAL_EVERY,
    "sft.batch_sequences": 8, "sft.checkpoint_every": 0,
    "grpo.steps": GRPO_STEPS, "grpo.eval_every": 1, "grpo.checkpoint_every": 0, "grpo.problems_per_step": 4,
    "grpo.algorithm.group_size": 4,
    "eval.problems": EVAL_PROBLEMS, "eval.sample_trees": SAMPLE_TREES,
    "rollout.runtime.max_tokens": 48, "rollout.runtime.context_window": 256,
    "rollout.pool.num_workers": 1, "rollout.backend": "vllm",
    "tracking.enabled": True, "tracking.experiment": "e2e", "tracking.run_name": "e2e-run",
}
GRPO_KEYS = ("reward_mean", "accuracy", "tokens_total_mean", "tokens_critical_path_mean", "threads_per_tree",
             "spawn_rate", "rollout_tokens_per_s", "learner_tokens_per_s", "sync_s", "version_lag_mean", "pool_size")
LADDER = ("solved", "threads_well_formed", "moves_from_state", "moves_correct_arithmetic", "spawn_share")

# Raised by MLflow's own mappers when the test opens the database; nothing the project can act on.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def steps(client, run_id: str, key: str) -> list[int]:
    return [s for s, _ in history(client, run_id, key)]


# ---------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One `apr-ray run` in a subprocess (its own Ray cluster and vLLM engine, as from a shell)."""
    pytest.importorskip("vllm")
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("e2e") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run(
        # no --no-progress: the output is a pipe, so the job prints progress lines, which a test reads
        [sys.executable, "-m", "apr_ray.cli", "run", "--set", f"output_dir={out}", *sets(OVERRIDES)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    assert exp is not None, "no experiment 'e2e' in the run's database"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return {"out": out, "proc": proc, "client": client, "parent": parent, "children": children, "runs": runs}



@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_run_prints_the_summary_and_the_mlflow_pointer(job):
    stdout, parent = job["proc"].stdout, job["parent"]
    assert "validation ladder" in stdout
    for label in ("after SFT", "after GRPO", "test"):
        assert label in stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{job['out']}/mlflow.db" in stdout
    assert parent.info.run_id in stdout  # the hint opens this run's page


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_run_is_one_finished_pipeline_run_with_a_finished_run_per_stage(job):
    parent, children = job["parent"], job["children"]
    assert parent.info.run_name == "e2e-run" and parent.info.status == "FINISHED"
    assert sorted(children) == ["eval", "grpo", "sft"]
    assert len(job["runs"]) == 4
    for name, run in children.items():
        assert run.info.status == "FINISHED", name


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_params_are_the_resolved_config(job):
    from apr_ray.tracking import flatten

    params = job["parent"].data.params
    assert params["sft.steps"] == str(SFT_STEPS)
    assert params["data.problems.num_operands"] == "3"
    assert params["grpo.eval_every"] == "1"
    assert params["rollout.backend"] == "vllm"
    assert params["output_dir"] == str(job["out"])
    resolved = flatten(yaml.safe_load((job["out"] / "config.yaml").read_text()))
    assert set(params) == set(resolved)
    assert {k: v for k, v in params.items() if params[k] != str(resolved[k])} == {}


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_sft_metrics_and_its_two_evaluations(job):
    client, sft, parent = job["client"], job["children"]["sft"], job["parent"]
    logged = [SFT_EVAL_EVERY, SFT_STEPS]  # sft.log_every = sft.eval_every = 3 over 6 steps
    for key in ("sft/loss", "sft/tokens_per_s", *(f"val/{k}" for k in LADDER)):
        assert steps(client, sft.info.run_id, key) == logged, key
    for _, loss in history(client, sft.info.run_id, "sft/loss"):
        assert math.isfinite(loss) and loss > 0
    assert all(v > 0 for _, v in history(client, sft.info.run_id, "sft/tokens_per_s"))
    for _, v in history(client, sft.info.run_id, "val/num_trees"):
        assert v == EVAL_PROBLEMS
    # The pipeline run holds the same SFT curve on the job's shared x axis (SFT steps come first).
    assert history(client, parent.info.run_id, "sft/loss") == history(client, sft.info.run_id, "sft/loss")


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_grpo_metrics_every_step_and_validation_every_step(job):
    client, grpo, parent = job["client"], job["children"]["grpo"], job["parent"]
    for key in GRPO_KEYS:
        assert steps(client, grpo.info.run_id, f"grpo/{key}") == [1, 2], key
        # On the pipeline run, GRPO step N is logged at sft.steps + N.
        assert steps(client, parent.info.run_id, f"grpo/{key}") == [SFT_STEPS + 1, SFT_STEPS + 2], key
    for key in LADDER:
        assert steps(client, grpo.info.run_id, f"val/{key}") == [1, 2], key
        assert steps(client, parent.info.run_id, f"val/{key}") == [SFT_EVAL_EVERY, SFT_STEPS, SFT_STEPS + 1,
                                                                   SFT_STEPS + 2], key
    m = {k: [v for _, v in history(client, grpo.info.run_id, f"grpo/{k}")] for k in GRPO_KEYS}
    assert m["pool_size"] == [1.0, 1.0]  # rollout.pool.num_workers=1, nothing failed
    assert m["version_lag_mean"] == [0.0, 0.0]  # rollout and training do not overlap
    for key in ("reward_mean", "accuracy", "spawn_rate"):
        assert all(0.0 <= v <= 1.0 for v in m[key]), (key, m[key])
    assert all(v >= 1.0 for v in m["threads_per_tree"])
    assert all(0 < c <= t for c, t in zip(m["tokens_critical_path_mean"], m["tokens_total_mean"]))
    assert all(v > 0 for v in m["rollout_tokens_per_s"] + m["learner_tokens_per_s"])
    assert all(v >= 0 for v in m["sync_s"])
    for key in LADDER:
        assert all(0.0 <= v <= 1.0 for _, v in history(client, grpo.info.run_id, f"val/{key}")), key


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_test_split_metrics_match_the_summary_and_the_tree_artifacts(job, tmp_path):
    client, ev, parent = job["client"], job["children"]["eval"], job["parent"]
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert list(summary["evaluations"]) == ["after SFT", "after GRPO", "test"]
    test = summary["evaluations"]["test"]
    assert test["num_trees"] == EVAL_PROBLEMS
    for run in (ev, parent):
        for key in LADDER + ("num_trees",):
            assert history(client, run.info.run_id, f"test/{key}") == [(0, pytest.approx(test[key]))], key
    local = Path(client.download_artifacts(ev.info.run_id, "trees/test", str(tmp_path)))
    assert json.loads((local / "metrics.json").read_text()) == pytest.approx(test)


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_trees_are_logged_as_json_records_and_html_pages(job, tmp_path):
    from apr_ray.types import tree_from_dict

    client = job["client"]
    for stage, label in (("sft", f"sft_step{SFT_STEPS}"), ("grpo", f"grpo_step{GRPO_STEPS}"), ("eval", "test")):
        run_id = job["children"][stage].info.run_id
        local = Path(client.download_artifacts(run_id, f"trees/{label}", str(tmp_path / stage)))
        trees = [tree_from_dict(d) for d in json.loads((local / "trees.json").read_text())]
        assert len(trees) == SAMPLE_TREES, stage
        for tree in trees:
            assert tree.threads and len(tree.nums) == 3 and tree.metrics.tokens_total > 0
        pages = sorted(local.glob("tree*.html"))
        assert len(pages) == SAMPLE_TREES, stage
        assert pages[0].read_text().lstrip().lower().startswith("<!doctype html")


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_run_artifacts(job, tmp_path):
    client, parent, out = job["client"], job["parent"], job["out"]
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json", "plots", "model"} <= top
    local = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path)))
    assert (local / "config.yaml").read_text() == (out / "config.yaml").read_text()
    assert (local / "plots" / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((local / "summary.json").read_text())
    assert summary["model_dir"] == str(out / "grpo" / "model") and summary["interrupted"] is False
    assert set(summary["stage_s"]) == {"data", "sft", "grpo", "eval"}
    model = local / "model"
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] > 0
    weights = list(model.glob("*.safetensors"))
    assert weights and all(w.stat().st_size > 100_000 for w in weights)
    assert (model / "tokenizer.json").is_file()


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_metrics_file_has_each_metric_once_per_step(job):
    """output_dir/metrics.jsonl is the pipeline run's record: one x axis, nothing written twice."""
    seen: dict[str, list[int]] = {}
    for line in (job["out"] / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in row.keys() - {"step", "time"}:
            seen.setdefault(key, []).append(row["step"])
    assert seen["sft/loss"] == [SFT_EVAL_EVERY, SFT_STEPS]
    assert seen["grpo/reward_mean"] == [SFT_STEPS + 1, SFT_STEPS + 2]
    assert seen["val/solved"] == [SFT_EVAL_EVERY, SFT_STEPS, SFT_STEPS + 1, SFT_STEPS + 2]


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_run_refuses_data_written_with_other_settings(job, tmp_path, capsys):
    """The data of a real run, with one data setting changed: refused before anything starts, naming the folder."""
    out = tmp_path / "stale"
    shutil.copytree(job["out"] / "data", out / "data")
    changed = OVERRIDES | {"data.train_problems": DATA["data.train_problems"] + 1, "tracking.enabled": False}
    assert main(["run", "--no-progress", "--set", f"output_dir={out}", *sets(changed)]) == 2
    err = capsys.readouterr().err
    assert "other data settings" in err and str(out / "data") in err
    assert not (out / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------- quick errors


def test_run_rejects_a_config_typo_before_starting_anything(capsys):
    assert main(["run", "--set", "data.trian_problems=5"]) == 2
    assert "did you mean 'train_problems'" in capsys.readouterr().err


def test_demos_from_a_missing_problems_dataset_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["data", "demos", "--problems", str(missing), "--out", str(tmp_path / "demos")]) == 2
    err = capsys.readouterr().err
    assert "no such problems dataset" in err and str(missing) in err
    assert not (tmp_path / "demos").exists()


def test_eval_without_a_trained_model_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["eval", "--set", f"output_dir={out}", "--set", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "no trained model" in err and str(out) in err


THIRD_PARTY_LINES = ("logging_progress", "Running Dataset", "Writing model shards", "Loading weights",
                     "Setting accelerator", "Token authentication", "Started a local Ray instance", "UserWarning")


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_piped_output_is_the_jobs_own_progress_and_summary(job):
    """The job's output went to a pipe (no terminal): its own lines only, the libraries' in job.log."""
    proc, out = job["proc"], job["out"]
    printed = proc.stdout + proc.stderr
    for chatter in THIRD_PARTY_LINES:
        assert chatter not in printed, chatter
    assert "\r" not in printed  # no carriage-return progress bars
    assert f"sft: step {SFT_STEPS}/{SFT_STEPS} (100%)" in proc.stdout
    assert f"grpo: step {GRPO_STEPS}/{GRPO_STEPS} (100%)" in proc.stdout
    assert "step/s" in proc.stdout and "ETA" in proc.stdout
    assert str(out / "job.log") in proc.stdout and (out / "job.log").stat().st_size > 0
    closing = proc.stdout.rstrip().splitlines()[-3:]
    assert any(line.startswith("MLflow:") for line in closing), closing  # the summary closes the output
