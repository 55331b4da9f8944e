"""The sampled evaluation's numbers and the paired difference of two evaluations on one problem set."""

from __future__ import annotations

import pytest

from apr_ray.countdown.problems import Problem
from apr_ray.evaluation import Evaluator, paired_difference
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.types import TreeMetrics, TreeRecord


def tree(correct: bool) -> TreeRecord:
    return TreeRecord(24, [1, 2, 3], [], TreeMetrics(0, 0, 1, 1, 0, 0, 0.0), None, correct, problem_id="p")


def evaluator(problems: int, sampled: int, k: int) -> Evaluator:
    runtime = RuntimeConfig(max_tokens=64, context_window=128, sampling=SamplingConfig(temperature=1.0))
    return Evaluator([Problem(24, (1, 2, 3 + i)) for i in range(problems)], tokenizer=None, protocol="apr",
                     runtime=runtime, sampling=SamplingConfig(temperature=0.0), sampled_problems=sampled,
                     samples_per_problem=k, sampled_seed=7)


def test_sampled_solve_rate_counts_samples_and_problems():
    ev = evaluator(problems=5, sampled=3, k=2)
    assert [p.nums[-1] for p in ev.sampled] == [3, 4, 5]  # the first evaluated problems
    # training temperature, fixed seed: every evaluation draws the same numbers
    assert ev.sampled_sampling.temperature == 1.0 and ev.sampled_sampling.seed == 7
    assert ev.runtime_cfg.sampling.temperature == 0.0  # the greedy ladder is untouched
    out = ev.score_sampled([tree(c) for c in (True, False, False, False, True, True)])
    assert out == {"sampled_solved": pytest.approx(3 / 6), "sampled_pass_any": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="5 sampled trees for 3 problems x 2 samples"):
        ev.score_sampled([tree(True)] * 5)


def test_no_sampled_evaluation_by_default():
    ev = evaluator(problems=2, sampled=0, k=4)
    assert ev.sampled == []


def test_paired_difference_by_hand():
    before = [True, False, False, True, False]
    after = [True, True, False, False, True]  # diffs 0, 1, 0, -1, 1: mean 0.2, sample var 0.7
    mean, lo, hi = paired_difference(before, after)
    half = 1.96 * (0.7 / 5) ** 0.5
    assert (mean, lo, hi) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert paired_difference([False] * 4, [True] * 4) == pytest.approx((1.0, 1.0, 1.0))  # no spread
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_difference([True], [True, False])
