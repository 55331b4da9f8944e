"""The learning guard: the trainer's SFT must learn, or this test fails. SFT from scratch on a fixed small
set must lift a rung of the validation ladder, the share of well-formed threads, from 0 (an untrained model
never ends a thread cleanly) past a threshold.

It runs the plain script (`python -m apr_ray.plain`): the same data writers, SFT loop, DeepSpeed learner,
evaluator and ladder as `apr-ray run`, in one process, so the minutes go to training and not to starting
Ray and vLLM (the Ray path of the same stages is run end to end by test_cli_run.py). The number is read back
from the run's logged metrics (metrics.jsonl). The threshold comes from the measured runs below
(docs/results.md, "The learning guard"), with a wide margin.

Not guarded yet: GRPO raising the reward. Minutes of SFT on 2 cores give a model with no correct sample even
on 32 memorised train problems (measured: reward 0 in all 6 GRPO steps), so there is no reward to raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SFT_STEPS = 300
OVERRIDES = {
    "data.train_problems": 32, "data.val_problems": 20, "data.test_problems": 8,
    "sft.steps": SFT_STEPS, "sft.eval_every": 0,
    "eval.problems": 20, "eval.sampled_problems": 0, "eval.sample_trees": 0,
}
# measured with this script (2026-12-01): 0.926 (seed 0), 0.447 (seed 1); through the Ray job: 0.892 (seed 0,
# 2026-11-30); the untrained model: 0.0. Seeds spread widely after 300 steps, hence the low bar.
MIN_WELL_FORMED_AFTER_SFT = 0.2


def run_sft(out, seed: int) -> list[dict]:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "apr_ray.plain", "--no-progress", "--workers", "1", "--set", f"output_dir={out}",
         "--set", f"seed={seed}", *sets],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def well_formed_after_sft(rows: list[dict]) -> float:
    values = [r["val/threads_well_formed"] for r in rows if r["step"] == SFT_STEPS and "val/threads_well_formed" in r]
    assert len(values) == 1, values
    return values[0]


@pytest.mark.slow
def test_sft_lifts_the_ladder(tmp_path):
    assert well_formed_after_sft(run_sft(tmp_path / "run", seed=0)) >= MIN_WELL_FORMED_AFTER_SFT


if __name__ == "__main__":  # calibration: python tests/e2e/test_learning.py OUT_DIR SEED...
    from pathlib import Path

    for seed in sys.argv[2:]:
        print(seed, well_formed_after_sft(run_sft(Path(sys.argv[1]) / f"seed{seed}", int(seed))), flush=True)
