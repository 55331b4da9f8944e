"""Job submission against a real Ray head started on loopback (`ray start --head`, token auth on) and a real
`mlflow server`, as a user submits: a shrunken `apr-ray run` job with the stack already on the cluster
(`--stack none`) is followed to the end, exits 0, and its MLflow runs are on the tracking server; the same
job through plain `ray job submit` (jobs/submit.sh) succeeds too; a bad config sent that way ends FAILED
with the key named; a job that fails makes `apr-ray submit --follow` exit 1; a wrong token is refused.
The test stops only the processes it started (`ray stop` with the head's own environment)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
OVERRIDES = {"data.train_problems": 40, "data.val_problems": 4, "data.test_problems": 4, "sft.steps": 2,
             "sft.batch_sequences": 4, "grpo.steps": 1, "grpo.problems_per_step": 2, "grpo.algorithm.group_size": 2,
             "eval.problems": 2, "eval.sampled_problems": 0, "rollout.backend": "transformers",
             "rollout.runtime.max_tokens": 32, "rollout.runtime.context_window": 256,
             "tracking.enabled": True, "tracking.experiment": "submitted", "learners.cpus_per_learner": 1,
             # two such jobs side by side on the 4-CPU head: a learner and one generator each
             "rollout.pool.num_workers": 1}


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


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(1)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def submit(head, *args: str, overrides: dict = OVERRIDES, env: dict | None = None) -> subprocess.CompletedProcess:
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    try:  # within pytest's own timeout, so that a job that hangs shows what it printed
        return subprocess.run([sys.executable, "-m", "apr_ray.cli", "submit", "--address", head["address"],
                               "--stack", "none", "--follow", *args, *sets], env=env or head["env"],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"apr-ray submit --follow still running after 600 s; it printed:\n{(e.stdout or '')[-6000:]}")


@pytest.fixture(scope="module")
def plain_submission(head, tmp_path_factory):
    """The same shrunken job sent with plain `ray job submit` (jobs/submit.sh), started here and left running:
    the test of `apr-ray submit` runs its own job meanwhile, so the two run side by side on the head as two
    users' jobs would (and the test waits for the slower of the two, not for their sum)."""
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    env = head["env"] | {"RAY_ADDRESS": head["address"], "STACK": "none"}
    script = str(Path(__file__).resolve().parents[2] / "jobs" / "submit.sh")
    logs = tmp_path_factory.mktemp("plain-submit")
    with open(logs / "stdout.txt", "w") as so, open(logs / "stderr.txt", "w") as se:
        proc = subprocess.Popen(["bash", script, "--set", f"output_dir={logs / 'run'}", *sets], env=env, stdout=so,
                                stderr=se)
    try:
        yield {"proc": proc, "script": script, "env": env, "logs": logs}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_submitted_run_is_followed_to_the_end_and_logs_to_the_tracking_server(head, plain_submission,
                                                                                 tracking_server, tmp_path):
    from mlflow.tracking import MlflowClient

    assert (head["home"] / ".ray" / "auth_token").is_file()
    out = tmp_path / "run"
    start = time.monotonic()
    proc = submit(head, "--set", f"output_dir={out}", env=head["env"] | {"MLFLOW_TRACKING_URI": tracking_server})
    wall_s = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "token from" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "validation ladder" in proc.stdout  # the job's own summary, streamed back
    print(f"apr-ray submit --follow of the shrunken run (a second job beside it): {wall_s:.0f} s from submit to "
          "SUCCEEDED")

    client = MlflowClient(tracking_uri=tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("submitted").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 4  # the job and its three stages
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "summary.json", "model"}
    assert not (out / "mlflow.db").exists()  # the server holds the runs, not a file beside the job


def test_plain_ray_job_submit_runs_the_job_and_a_bad_config_fails_naming_the_key(plain_submission):
    proc, logs = plain_submission["proc"], plain_submission["logs"]
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pass  # reported below, with what the job printed
    stdout, stderr = (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text()
    assert proc.returncode is not None, "ray job submit still running after 600 s; it printed:\n" + stdout[-6000:]
    assert proc.returncode == 0 and "succeeded" in stdout.lower(), stdout[-4000:] + stderr[-4000:]
    bad = subprocess.run(["bash", plain_submission["script"], "--set", "sft.stepz=3"], env=plain_submission["env"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "failed" in (bad.stdout + bad.stderr).lower(), bad.stdout[-4000:] + bad.stderr
    assert "did you mean 'steps'" in bad.stdout + bad.stderr


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
