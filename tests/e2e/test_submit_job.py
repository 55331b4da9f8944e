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
    """A Ray head on this machine with its own HOME (its token lands in HOME/.ray/auth_token)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"HOME": str(home), "PATH": f"{BIN}:{env['PATH']}"}
    port = free_port()
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=4", f"--port={free_port()}",
                            f"--dashboard-port={port}", "--include-dashboard=true", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{port}", "home": home}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(head, *args: str) -> subprocess.CompletedProcess:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    return subprocess.run([sys.executable, "-m", "apr_ray.cli", "submit", "--address", head["address"], "--stack",
                           "none", "--follow", *args, *sets], env=head["env"], capture_output=True, text=True,
                          timeout=900)


def test_a_submitted_run_is_followed_to_the_end_and_logs_to_its_mlflow_store(head, tmp_path):
    assert (head["home"] / ".ray" / "auth_token").is_file()  # the head turned token auth on
    out = tmp_path / "run"
    proc = submit(head, "--set", f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "token from" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "validation ladder" in proc.stdout  # the job's own summary, streamed back

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("submitted").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4  # the job and its three stages


def test_a_failed_job_makes_submit_exit_1(head, tmp_path):
    proc = submit(head, "--stage", "eval", "--set", f"output_dir={tmp_path / 'empty'}")  # no trained model there
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no trained model" in proc.stdout and "FAILED" in proc.stdout
