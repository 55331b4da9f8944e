"""`apr-ray submit` against a real Ray head (`ray start --head`, token auth on as Ray 2.60 starts it), as a
user submits: a shrunken `apr-ray run` job with the stack already on the cluster (`--stack none`) is
followed to the end, exits 0, and its MLflow run is in the output directory it was given; a job that fails
makes `apr-ray submit --follow` exit 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
OVERRIDES = {"data.train_problems": 40, "data.val_problems": 4, "data.test_problems": 4, "sft.steps": 2,
             "sft.batch_sequences": 4, "grpo.steps": 1, "grpo.problems_per_step": 2, "grpo.algorithm.group_size": 2,
             "eval.problems": 2, "eval.sampled_problems": 0, "rollout.backend": "transformers",
             "rollout.runtime.max_tokens": 32, "rollout.runtime.context_window": 256,
             "tracking.enabled": True, "tracking.experiment": "submitted", "learners.cpus_per_learner": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with token auth on, as an admin starts one (`ray get-auth-token --generate`, then
    RAY_AUTH_MODE=token), under its own HOME: the token is in HOME/.ray/auth_token, where the client finds it.
    The client's environment has no RAY_AUTH_MODE: `apr-ray submit` must turn token mode on by itself."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"HOME": str(home), "PATH": f"{BIN}:{env['PATH']}"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True,
                   timeout=120)
    port = free_port()
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=4", f"--port={free_port()}",
                            f"--dashboard-port={port}", "--include-dashboard=true", "--disable-usage-stats"],
                           env=env | {"RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{port}", "home": home}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env | {"RAY_AUTH_MODE": "token"},
                       capture_output=True, timeout=120)


def submit(head, *args: str, overrides: dict = OVERRIDES) -> subprocess.CompletedProcess:
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    return subprocess.run([sys.executable, "-m", "apr_ray.cli", "submit", "--address", head["address"], "--stack",
                           "none", "--follow", *args, *sets], env=head["env"], capture_output=True, text=True,
                          timeout=900)


def test_a_submitted_run_is_followed_to_the_end_and_logs_to_its_mlflow_store(head, tmp_path):
    assert (head["home"] / ".ray" / "auth_token").is_file()
    out = tmp_path / "run"
    proc = submit(head, "--set", f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "token from" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "validation ladder" in proc.stdout  # the job's own summary, streamed back

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("submitted").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4  # the job and its three stages


def test_without_the_token_the_submission_is_refused(head, tmp_path):
    env = head["env"] | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    proc = subprocess.run([sys.executable, "-m", "apr_ray.cli", "submit", "--address", head["address"], "--stack",
                           "none", "--set", f"output_dir={tmp_path}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "submitted" not in proc.stdout


def test_a_failed_job_makes_submit_exit_1(head, tmp_path):
    evaluation = {k: v for k, v in OVERRIDES.items() if k.split(".")[0] not in ("sft", "grpo", "learners")}
    proc = submit(head, "--stage", "eval", "--set", f"output_dir={tmp_path / 'empty'}",  # no trained model there
                  overrides=evaluation)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no trained model" in proc.stdout and "FAILED" in proc.stdout
