"""Reward catalogue: correctness, critical-path bonus (cap, gating, guards), penalties, config."""

import pytest
from pydantic import ValidationError

from apr_ray.rewards import REWARD_TERMS, RewardConfig, acceleration_ratio, score_tree
from apr_ray.types import TreeMetrics, TreeRecord


def tree(correct: bool, total: int, cp: int, threads: int = 1) -> TreeRecord:
    metrics = TreeMetrics(
        tokens_total=total,
        tokens_critical_path=cp,
        num_threads=threads,
        num_requests=threads,
        num_spawns=int(threads > 1),
        max_context=total,
        wall_s=0.0,
    )
    return TreeRecord(
        target=24, nums=[1, 2, 3, 4], threads=[], metrics=metrics,
        final_answer="x" if correct else None, correct=correct, problem_id="p7",
    )


def test_correct_sequential_tree_gets_no_bonus():
    r = score_tree(tree(True, 100, 100), RewardConfig())
    assert r.terms["correct"] == 1.0
    assert r.terms["critical_path"] == 0.0
    assert r.total == 1.0


def test_bonus_below_cap():
    # eta = 1 - 90/100 = 0.1, bonus = 0.3 * 0.1 = 0.03 (< cap 0.27)
    r = score_tree(tree(True, 100, 90, threads=3), RewardConfig())
    assert r.terms["critical_path"] == pytest.approx(0.03)
    assert r.total == pytest.approx(1.03)


def test_bonus_is_capped():
    # eta = 1 - 5/100 = 0.95, 0.3 * 0.95 = 0.285 -> capped at 0.27
    r = score_tree(tree(True, 100, 5, threads=5), RewardConfig())
    assert r.terms["critical_path"] == pytest.approx(0.27)
    assert r.total == pytest.approx(1.27)
    # eta = 0.8, 0.5 * 0.8 = 0.4 -> capped at 0.35
    r = score_tree(tree(True, 100, 20, threads=5), RewardConfig(critical_path_coef=0.5, critical_path_cap=0.35))
    assert r.terms["critical_path"] == pytest.approx(0.35)


def test_default_bonus_rises_over_the_eta_of_solved_parallel_trees():
    # Solved spawning solver demonstrations: eta p5..p95 0.17..0.45 on the tiny problems, 0.25..0.84 on
    # the paper's, at most 0.85 (bench/eta_range.py, two seeds): the default bonus must rise across it all.
    etas = [0.15, 0.3, 0.45, 0.5, 0.7, 0.85]
    cfg = RewardConfig()
    bonus = [score_tree(tree(True, 1000, round(1000 * (1 - eta)), threads=4), cfg).terms["critical_path"]
             for eta in etas]
    assert all(a < b for a, b in zip(bonus, bonus[1:])), bonus
    assert bonus[-1] < cfg.critical_path_cap


def test_incorrect_tree_gets_no_bonus():
    r = score_tree(tree(False, 100, 20, threads=5), RewardConfig())
    assert r.terms == {"correct": 0.0, "critical_path": 0.0, "critical_path_tokens": 0.0,
                       "critical_path_excess": 0.0, "token_cap": 0.0, "token_cost": 0.0, "threads": 0.0}
    assert r.total == 0.0
    assert score_tree(tree(False, 100, 20), RewardConfig(incorrect_reward=-1.0)).total == -1.0


def test_critical_path_tokens_pays_the_shorter_critical_path_not_the_wider_tree():
    cfg = RewardConfig(critical_path_enabled=False, critical_path_tokens_coef=1.0, critical_path_tokens_ref=1000)
    short, long = (score_tree(tree(True, 900, cp, threads=4), cfg) for cp in (300, 600))
    assert short.terms["critical_path_tokens"] == pytest.approx(0.7)
    assert long.terms["critical_path_tokens"] == pytest.approx(0.4)
    # Wider with a longer critical path: eta rises (0.5 -> 0.6), this term falls (0.7 -> 0.6).
    narrow, wide = tree(True, 600, 300, threads=2), tree(True, 1000, 400, threads=6)
    assert acceleration_ratio(wide) > acceleration_ratio(narrow)
    assert score_tree(wide, cfg).total < score_tree(narrow, cfg).total
    assert score_tree(tree(True, 2000, 1500), cfg).terms["critical_path_tokens"] == 0.0  # past ref: nothing
    assert score_tree(tree(False, 900, 300), cfg).terms["critical_path_tokens"] == 0.0  # wrong: nothing
    assert score_tree(tree(True, 900, 300), RewardConfig()).terms["critical_path_tokens"] == 0.0  # off by default


def test_critical_path_excess_charges_only_beyond_the_budget():
    cfg = RewardConfig(critical_path_enabled=False, critical_path_excess_coef=2.0, critical_path_excess_ref=400)
    within, at, beyond = (score_tree(tree(True, 900, cp, threads=4), cfg) for cp in (250, 400, 500))
    assert within.terms["critical_path_excess"] == 0.0  # short trees feel no pull to cut their search
    assert at.terms["critical_path_excess"] == 0.0
    assert beyond.terms["critical_path_excess"] == pytest.approx(-0.5)  # 2 x (500 / 400 - 1)
    assert beyond.total == pytest.approx(0.5)
    assert score_tree(tree(False, 900, 800), cfg).terms["critical_path_excess"] == 0.0  # wrong: nothing to pay
    assert score_tree(tree(True, 900, 800), RewardConfig()).terms["critical_path_excess"] == 0.0  # off by default


def test_bonus_disabled():
    r = score_tree(tree(True, 100, 20, threads=5), RewardConfig(critical_path_enabled=False))
    assert r.terms["critical_path"] == 0.0
    assert r.total == 1.0


def test_zero_tokens_is_guarded():
    assert acceleration_ratio(tree(True, 0, 0)) == 0.0
    assert score_tree(tree(True, 0, 0), RewardConfig()).total == 1.0


def test_inconsistent_metrics_name_the_tree():
    with pytest.raises(ValueError, match=r"'p7'.*tokens_critical_path=120.*tokens_total=100"):
        score_tree(tree(True, 100, 120), RewardConfig())


def test_token_cap_penalty():
    cfg = RewardConfig(token_cap=100, token_cap_penalty=0.5)
    assert score_tree(tree(True, 100, 100), cfg).terms["token_cap"] == 0.0  # at the cap: no penalty
    r = score_tree(tree(True, 101, 101), cfg)
    assert r.terms["token_cap"] == -0.5
    assert r.total == pytest.approx(0.5)


def test_token_cost_is_linear_in_the_tokens_of_the_whole_tree():
    cfg = RewardConfig(token_cost_per_1k=0.5, critical_path_enabled=False)
    assert score_tree(tree(False, 400, 100, threads=3), cfg).terms["token_cost"] == pytest.approx(-0.2)
    r = score_tree(tree(True, 1200, 1200), cfg)
    assert r.terms["token_cost"] == pytest.approx(-0.6) and r.total == pytest.approx(0.4)
    assert score_tree(tree(True, 1200, 1200), RewardConfig()).terms["token_cost"] == 0.0  # off by default


def test_thread_penalty_per_thread_over_limit():
    cfg = RewardConfig(max_threads=3, thread_penalty=0.1, critical_path_enabled=False)
    assert score_tree(tree(True, 100, 50, threads=3), cfg).terms["threads"] == 0.0
    r = score_tree(tree(True, 100, 50, threads=5), cfg)
    assert r.terms["threads"] == pytest.approx(-0.2)
    assert r.total == pytest.approx(0.8)


def test_breakdown_sums_to_total_with_every_term():
    cfg = RewardConfig(token_cap=50, token_cap_penalty=0.3, max_threads=2, thread_penalty=0.1, token_cost_per_1k=1.0)
    r = score_tree(tree(True, 100, 40, threads=4), cfg)
    assert list(r.terms) == list(REWARD_TERMS)
    # 1 + min(0.3 * 0.6, 0.27) - 0.3 - 0.1 * 2 - 100 / 1000
    assert r.total == pytest.approx(1 + 0.18 - 0.3 - 0.2 - 0.1)
    assert r.total == pytest.approx(sum(r.terms.values()))


def test_config_rejects_typos_and_bad_values():
    with pytest.raises(ValidationError, match="critical_path_coeff"):
        RewardConfig(critical_path_coeff=0.5)
    with pytest.raises(ValidationError, match="critical_path_cap"):
        RewardConfig(critical_path_cap=-0.1)
