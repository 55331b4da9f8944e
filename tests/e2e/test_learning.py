"""The learning guard: the trainer's SFT and GRPO must learn, or these tests fail.

1. SFT from scratch on a fixed small set must lift a rung of the validation ladder, the share of well-formed
   threads, from 0 (an untrained model never ends a thread cleanly) past a threshold. It runs the plain script
   (`python -m apr_ray.plain`): the same data writers, SFT loop, DeepSpeed learner, evaluator and ladder as
   `apr-ray run`, in one process, so the minutes go to training and not to starting Ray.
2. GRPO from that model (`apr-ray grpo`: Ray, the generator pool, the learner actor, weight sync) must raise
   the mean reward of its own rollouts over a few steps. Minutes of SFT give almost no correct sample to
   reward, so the guard's reward adds a cost the model can move: 2 per 1,000 generated tokens of a tree
   (`grpo.reward.token_cost_per_1k`), smooth, so every group of samples differs and every step has a
   gradient. The rise only happens when every link works: sampler logprobs, group advantages with the right
   sign, the loss on the sampled tokens, the optimizer step, and the generators sampling from the new weights
   (a sync that does nothing leaves the reward flat). The control, the same run at a learning rate of 1e-12,
   shows how much the reward moves by chance.

Numbers are read back from the run's logged metrics (metrics.jsonl). The thresholds come from measured runs
over several seeds (docs/results.md, "The learning guard"), with margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SFT_STEPS = 300
# what SFT and GRPO share (the workspace's data must match); `apr-ray grpo` refuses sft.* keys
OVERRIDES = {
    "data.train_problems": 32, "data.val_problems": 20, "data.test_problems": 8,
    "eval.problems": 20, "eval.sampled_problems": 0, "eval.sample_trees": 0,
}
SFT_OVERRIDES = {"sft.steps": SFT_STEPS, "sft.eval_every": 0}
GRPO_STEPS = 8
GRPO_LR = 5e-4
GRPO_OVERRIDES = {
    "grpo.steps": GRPO_STEPS, "grpo.eval_every": 0, "grpo.checkpoint_every": 0,
    "grpo.reward.critical_path_enabled": "false", "grpo.reward.token_cost_per_1k": 2.0,
}
# measured with this script (2026-12-01): 0.926 (seed 0), 0.447 (seed 1); through the Ray job: 0.892 (seed 0,
# 2026-11-30); the untrained model: 0.0. Seeds spread widely after 300 steps, hence the low bar.
MIN_WELL_FORMED_AFTER_SFT = 0.2
# `reward_rise`, measured with this script (2026-12-07, docs/results.md "The GRPO learning guard"): at lr 5e-4
# 0.421 (seed 0), 0.320 (seed 1), 0.213 (seed 2); the control at lr 1e-12: -0.018 (seed 0), -0.065 (seed 1),
# a step's mean reward varying by ~0.04 around a flat line. Half the weakest seed's rise, 2.5 control spreads.
MIN_REWARD_RISE = 0.1


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_sft(out: Path, seed: int) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "apr_ray.plain", "--no-progress", "--workers", "1", "--set", f"output_dir={out}",
         "--set", f"seed={seed}", *_sets(OVERRIDES | SFT_OVERRIDES)],
        capture_output=True, text=True, env=_env(), timeout=1200,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return _metrics(out)


def after_sft(rows: list[dict], key: str) -> float:
    values = [r[f"val/{key}"] for r in rows if r["step"] == SFT_STEPS and f"val/{key}" in r]
    assert len(values) == 1, values
    return values[0]


def run_grpo(out: Path, seed: int, lr: float) -> list[float]:
    """GRPO steps from the SFT model in `out` with the guard's length penalty; the mean reward of each step."""
    rows_before = _metrics(out)
    grpo = GRPO_OVERRIDES | {"grpo.learner.lr": lr}
    proc = subprocess.run(
        [sys.executable, "-m", "apr_ray.cli", "grpo", "--no-progress", "--set", f"output_dir={out}",
         "--set", f"seed={seed}", *_sets(OVERRIDES | grpo)],
        capture_output=True, text=True, env=_env(), timeout=1200,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rewards = [r["grpo/reward_mean"] for r in _metrics(out)[len(rows_before):] if "grpo/reward_mean" in r]
    assert len(rewards) == GRPO_STEPS, rewards
    return rewards


def reward_rise(rewards: list[float]) -> float:
    """Mean reward of the last half of the steps minus the first step's (the SFT model's own rollouts)."""
    late = rewards[len(rewards) // 2:]
    return sum(late) / len(late) - rewards[0]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("learning") / "run"
    return out, run_sft(out, seed=0)


@pytest.mark.slow
def test_sft_lifts_the_ladder(sft_run):
    _, rows = sft_run
    assert after_sft(rows, "threads_well_formed") >= MIN_WELL_FORMED_AFTER_SFT


@pytest.mark.slow
@pytest.mark.ray
def test_grpo_raises_the_reward(sft_run):
    out, _ = sft_run
    rewards = run_grpo(out, seed=0, lr=GRPO_LR)
    assert reward_rise(rewards) >= MIN_REWARD_RISE, rewards


if __name__ == "__main__":  # calibration: python tests/e2e/test_learning.py OUT_DIR LR SEED...
    root, lr = Path(sys.argv[1]), float(sys.argv[2])
    for seed in sys.argv[3:]:
        out = root / f"seed{seed}"
        if not (out / "sft" / "model").is_dir():
            run_sft(out, int(seed))
        rows = _metrics(out)
        rewards = run_grpo(out, int(seed), lr)
        print(json.dumps({"seed": seed, "lr": lr, "well_formed": after_sft(rows, "threads_well_formed"),
                          "tokens_after_sft": after_sft(rows, "tokens_total_mean"),
                          "rewards": [round(r, 3) for r in rewards], "rise": round(reward_rise(rewards), 3)}),
              flush=True)
