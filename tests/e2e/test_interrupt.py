"""Ctrl-C during `apr-ray sft`, as a user presses it: the SFT stage stops after its current step, writes a
DeepSpeed checkpoint under output_dir/sft/checkpoints/step_N, ends the MLflow pipeline run and its `sft`
run as KILLED, says "interrupted" and exits 130 without a traceback (docs/training.md, "Ctrl-C").

Also, in this process: the SFT loop's own handling of one and of two Ctrl-C (milliseconds, no Ray).

The command runs in its own process group and the signal goes to the whole group, as a terminal sends it:
Ray's own processes see it too, which is what a user's Ctrl-C does to them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Many steps, so the run is surely mid-training when the signal comes; no periodic checkpoint or
# evaluation, so the only checkpoint is the one the interrupt writes. The transformers engine serves the
# evaluations: the stage starts its generator beside SFT, and a vLLM start would only slow the test.
OVERRIDES = {
    "data.train_problems": 40, "data.val_problems": 20, "data.test_problems": 20, "eval.problems": 4,
    "rollout.backend": "transformers",
    "sft.steps": 100_000, "sft.eval_every": 0, "sft.checkpoint_every": 0, "sft.log_every": 2,
    "sft.batch_sequences": 4,
    "tracking.enabled": True, "tracking.experiment": "interrupt",
}
START_TIMEOUT_S, STOP_TIMEOUT_S = 240, 180

# Raised by MLflow's own mappers when the test opens the database; nothing the project can act on.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def _logged_steps(metrics: Path, key: str) -> list[int]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return [row["step"] for row in rows if key in row]


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _sigint_as_in_a_terminal() -> None:
    """A command started in the background of a shell (`make test &`, nohup) inherits SIGINT ignored, and then
    rightly installs no Ctrl-C handler: these tests are about a foreground command, so they undo that."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def sigint_handled():
    before = signal.getsignal(signal.SIGINT)
    _sigint_as_in_a_terminal()
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """`apr-ray sft` stopped with SIGINT once its loss is in metrics.jsonl."""
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("interrupt") / "run"
    logs = out.parent
    stdout_f, stderr_f = logs / "stdout.txt", logs / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    cmd = [sys.executable, "-m", "apr_ray.cli", "sft", "--no-progress", "--set", f"output_dir={out}", *sets]
    with open(stdout_f, "w") as so, open(stderr_f, "w") as se:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=so, stderr=se, start_new_session=True,
                                preexec_fn=_sigint_as_in_a_terminal)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _logged_steps(out / "metrics.jsonl", "sft/loss"):
                if proc.poll() is not None:
                    pytest.fail(f"apr-ray sft ended (exit {proc.returncode}) before logging a loss\n"
                                f"--- stdout\n{_tail(stdout_f)}\n--- stderr\n{_tail(stderr_f)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no sft/loss in metrics.jsonl after {START_TIMEOUT_S} s\n"
                                f"--- stdout\n{_tail(stdout_f)}\n--- stderr\n{_tail(stderr_f)}")
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground group
            try:
                code = proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"apr-ray sft still running {STOP_TIMEOUT_S} s after SIGINT\n"
                            f"--- stdout\n{_tail(stdout_f)}\n--- stderr\n{_tail(stderr_f)}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"out": out, "code": code, "stdout": stdout_f.read_text(errors="replace"),
            "stderr": stderr_f.read_text(errors="replace")}


@pytest.mark.slow
@pytest.mark.ray
def test_exits_130_saying_interrupted_without_a_traceback(interrupted):
    stdout, stderr = interrupted["stdout"], interrupted["stderr"]
    code = interrupted["code"]
    assert code == 130, f"exit {code}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}"
    assert "interrupted: SFT stopped at step" in stdout, stdout[-4000:]
    assert "sft: Ctrl-C: stopping after the current step" in stderr, stderr[-4000:]
    assert "Traceback (most recent call last)" not in stderr, stderr[-6000:]


@pytest.mark.slow
@pytest.mark.ray
def test_checkpoint_of_the_last_step_is_written(interrupted):
    out = interrupted["out"]
    ckpts = out / "sft" / "checkpoints"
    tags = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    assert len(tags) == 1, f"expected one checkpoint (checkpoint_every=0), found {tags} in {ckpts}"
    step = int(tags[0].removeprefix("step_"))
    # A loss was logged (log_every=2) before the signal; the steps after the last log are logged at the
    # stop, so the metrics end at the checkpoint's step.
    logged = _logged_steps(out / "metrics.jsonl", "sft/loss")
    assert logged and logged[0] == 2 and logged[-1] == step, (step, logged)
    assert (ckpts / "latest").read_text().strip() == tags[0]  # DeepSpeed's pointer to resume from
    files = {p.name for p in (ckpts / tags[0]).iterdir()}
    assert "mp_rank_00_model_states.pt" in files, files
    # The step the loop stopped at is the step the engine trained: the step in flight finished.
    import torch

    state = torch.load(ckpts / tags[0] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert state.get("optimizer") is not None  # ZeRO stage 0 keeps the optimizer state in this file
    client = state["apr_ray"]  # learner.engine's client-state key
    assert client["step"] == step and client["client"] == {"sft_step": step}, client


@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_pipeline_run_and_sft_run_are_killed(interrupted):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{interrupted['out']}/mlflow.db")
    exp = client.get_experiment_by_name("interrupt")
    assert exp is not None, "no experiment 'interrupt' in the run's database"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == ["sft"]
    assert parents[0].info.status == "KILLED"
    assert children["sft"].info.status == "KILLED"
    assert parents[0].info.end_time is not None and children["sft"].info.end_time is not None
    summary = json.loads((interrupted["out"] / "summary.json").read_text())
    assert summary["interrupted"] is True


# ------------------------------------------------------------------------- the loop, in this process


class _SignallingLearner:
    """Counts steps like the engine does; sends this process `signals[n]` SIGINTs during step n, as a
    Ctrl-C arriving while the driver waits on a remote step."""

    def __init__(self, signals: dict[int, int]) -> None:
        self.step, self.signals = 0, signals

    def sft_step(self, seqs):
        for _ in range(self.signals.get(self.step + 1, 0)):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns
        self.step += 1
        return {"loss": 1.0 / self.step, "grad_norm": 1.0, "lr": 1e-3, "tokens": 10, "seq_tokens": 20, "step_s": 0.01}


def _run_loop(signals: dict[int, int]):
    from itertools import repeat

    from apr_ray.config import SFTConfig
    from apr_ray.sft import run_sft

    cfg = SFTConfig(steps=1000, log_every=4, eval_every=2, checkpoint_every=0)
    learner, logged, evaluated, saved = _SignallingLearner(signals), [], [], []
    result = run_sft(cfg, learner, repeat([]), log=lambda m, step: logged.append((step, m["sft/loss"])),
                     evaluate=evaluated.append, checkpoint=lambda step: saved.append((step, learner.step)),
                     progress=False)
    return result, learner, logged, evaluated, saved


def test_one_ctrl_c_stops_after_the_step_in_flight_and_checkpoints_it(sigint_handled):
    before = signal.getsignal(signal.SIGINT)
    result, learner, logged, evaluated, saved = _run_loop({7: 1})
    assert result.interrupted and result.steps == 7 and learner.step == 7
    assert saved == [(7, 7)]  # the checkpoint's step is the step the learner trained
    # Logged at 4 (log_every), then the 3 steps since, at the stop: mean loss of steps 5..7.
    assert [s for s, _ in logged] == [4, 7]
    assert logged[1][1] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7) / 3)
    assert evaluated == [2, 4, 6]  # every eval_every steps; none at the interrupt
    assert result.tokens == 70
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_second_ctrl_c_abandons_the_step_in_flight(sigint_handled):
    before = signal.getsignal(signal.SIGINT)
    result, learner, logged, evaluated, saved = _run_loop({3: 2})
    # The second signal raises KeyboardInterrupt inside step 3 (before its update here): 2 steps done,
    # logged and checkpointed as such.
    assert result.interrupted and result.steps == 2 and learner.step == 2
    assert saved == [(2, 2)]
    assert [s for s, _ in logged] == [2] and evaluated == [2]
    assert signal.getsignal(signal.SIGINT) is before
