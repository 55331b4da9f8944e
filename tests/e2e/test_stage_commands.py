"""The stage commands as a new user meets them, each a subprocess as from a shell: `apr-ray grpo` and
`apr-ray eval` in a fresh output directory with only --model write the data they need; the plain script's
workspace is read by `apr-ray grpo`, and `apr-ray grpo --resume` continues its last checkpoint; `apr-ray eval` evaluates the split it is told; a workspace written with
other data settings is refused naming the setting. The transformers engine serves (no vLLM start)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from apr_ray.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DATA = {"data.train_problems": 40, "data.val_problems": 6, "data.test_problems": 4}
SHORT = {"rollout.runtime.max_tokens": 48, "rollout.runtime.context_window": 256, "eval.problems": 3,
         "eval.sampled_problems": 0, "eval.sample_trees": 1}
GRPO = {"grpo.steps": 1, "grpo.problems_per_step": 2, "grpo.algorithm.group_size": 2, "rollout.backend": "transformers",
        "tracking.enabled": False}


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def plain_workspace(tmp_path_factory):
    """A workspace written by the plain script (data, a 4-step SFT model)."""
    ws = tmp_path_factory.mktemp("plain") / "ws"
    run(["apr_ray.plain", "--no-progress", "--workers", "1", "--set", f"output_dir={ws}",
         *sets(DATA | SHORT | {"sft.steps": 4, "sft.batch_sequences": 4})])
    assert (ws / "sft" / "model" / "config.json").is_file() and (ws / "data" / "config.yaml").is_file()
    return ws


def test_plain_then_grpo_on_one_workspace(plain_workspace):
    proc = run(["apr_ray.cli", "grpo", "--no-progress", "--set", f"output_dir={plain_workspace}",
                *sets(DATA | SHORT | GRPO)])
    assert "problems: reusing" in proc.stdout  # the plain script's data, not a second copy
    assert "after GRPO" in proc.stdout
    assert (plain_workspace / "grpo" / "model" / "config.json").is_file()

    # --resume continues from that run's last checkpoint (step 1) when grpo.steps is raised: one more step,
    # sampled by generators serving the checkpoint's policy version, then its own checkpoint.
    resumed = run(["apr_ray.cli", "grpo", "--no-progress", "--resume", "--set", f"output_dir={plain_workspace}",
                   *sets(DATA | SHORT | GRPO | {"grpo.steps": 2})])
    assert "grpo: resumed from" in resumed.stdout and "(step 1, policy version 1)" in resumed.stdout, resumed.stdout
    rows = [json.loads(line) for line in (plain_workspace / "metrics.jsonl").read_text().splitlines()]
    grpo_steps = [r["step"] for r in rows if "grpo/reward_mean" in r]
    offset = RunConfig().sft.steps  # GRPO steps are logged after the config's SFT steps
    assert grpo_steps == [offset + 1, offset + 2], grpo_steps  # step 1, then the resumed step 2
    assert next(r for r in rows if r["step"] == offset + 2 and "grpo/reward_mean" in r)["grpo/version_lag_mean"] == 0.0
    assert (plain_workspace / "grpo" / "checkpoints" / "latest").read_text().strip() == "step_2"


def test_grpo_from_a_fresh_output_directory_with_only_a_model(plain_workspace, tmp_path):
    out = tmp_path / "fresh"
    proc = run(["apr_ray.cli", "grpo", "--no-progress", "--model", str(plain_workspace / "sft" / "model"),
                "--set", f"output_dir={out}", *sets(DATA | SHORT | GRPO)])
    assert "after GRPO" in proc.stdout
    assert (out / "data" / "problems").is_dir() and not (out / "data" / "demos-apr").exists()  # GRPO needs no demos
    assert yaml.safe_load((out / "data" / "config.yaml").read_text())["data"]["train_problems"] == 40


def test_eval_from_a_fresh_output_directory_evaluates_the_split_it_is_told(plain_workspace, tmp_path):
    out = tmp_path / "fresh"
    proc = run(["apr_ray.cli", "eval", "--no-progress", "--model", str(plain_workspace / "sft" / "model"),
                "--set", f"output_dir={out}", "--set", "eval.split=val",
                *sets(DATA | SHORT | {"rollout.backend": "transformers", "tracking.enabled": False})])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["evaluations"]) == ["val"] and summary["evaluations"]["val"]["num_trees"] == 3
    assert "[val]" in proc.stdout and "[test]" not in proc.stdout


def test_a_workspace_with_other_data_settings_names_the_setting(plain_workspace):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "apr_ray.cli", "eval", "--set", f"output_dir={plain_workspace}",
                           *sets(DATA | SHORT | {"data.val_problems": 7})], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "data.val_problems: 6 there, 7 here" in proc.stderr


def test_eval_sweep_writes_the_three_curves_and_logs_them_to_mlflow(plain_workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    out, model = tmp_path / "sweep", plain_workspace / "sft" / "model"
    sweep = {"eval.sweep.problems": 3, "eval.sweep.windows": "[40,96]", "eval.sweep.children": "[1,2]",
             "eval.sweep.samples": "[1,2]", "eval.sweep.latency_problems": 2, "tracking.experiment": "sweep"}
    # the 4-step model stands in for both: the sweep's plumbing is under test here, not the ordering
    proc = run(["apr_ray.cli", "eval", "--sweep", "--no-progress", "--model", str(model), "--baseline", str(model),
                "--set", f"output_dir={out}", *sets(DATA | SHORT | sweep)])
    local = out / "eval" / "sweep"
    for name in ("context", "tokens", "latency"):
        assert f"{name} ({local / name}.csv)" in proc.stdout
    context = list(csv.DictReader((local / "context.csv").open()))
    assert [(r["model"], r["setting"], r["window"]) for r in context] == [
        ("APR", s, w) for s in ("1 child", "2 children") for w in ("40", "96")] + [
        ("SoS+", "no budget", w) for w in ("40", "96")]
    for r in context:
        if r["model"] == "SoS+":  # one thread: it cannot generate more than its window holds
            assert float(r["tokens_total_mean"]) < int(r["window"])
    tokens = list(csv.DictReader((local / "tokens.csv").open()))
    assert {(r["metric"], r["n"]) for r in tokens} == {("greedy", "1"), ("pass@n", "1"), ("pass@n", "2"),
                                                       ("cons@n", "1"), ("cons@n", "2")}

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "eval/sweep")}
    assert logged == {f"eval/sweep/{n}.{e}" for n in ("context", "tokens", "latency") for e in ("csv", "md", "png")}
    fetched = client.download_artifacts(parent.info.run_id, "eval/sweep/latency.csv", str(tmp_path))
    assert open(fetched).read() == (local / "latency.csv").read_text()
    eval_run = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert {a.path for a in client.list_artifacts(eval_run.info.run_id, "eval/sweep")} == logged
