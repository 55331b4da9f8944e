"""Per-tree rewards: correctness, the critical-path bonus, optional penalties. Pure Python.

Owns the scalar reward of one thread tree. It reads only what the runtime already computed
(`TreeRecord.correct` from the strict checker, `TreeRecord.metrics` token counts): it never parses
text and never computes a critical path itself. Must not import torch, Ray or the runtime.

A reward is a sum of named terms. Each term is a function `(tree, cfg) -> float` registered in
`REWARD_TERMS` with `@reward_term("name")`; a disabled term returns 0.0, so every breakdown has the
same keys (stable metric names). To add a term: write the function, register it, add its fields to
`RewardConfig`.

Departures from the references (shared/research/parallel_reasoning.md §3):
- ThreadWeaver's released code rewards wrong answers with -1; here `incorrect_reward` defaults to 0
  (the paper's and APR's 0/1), configurable.
- APR's TinyRL defines length and thread penalties but never calls them; here they exist and are off
  by default, beside a smooth cost per generated token (`token_cost_per_1k`).
- ThreadWeaver's bonus min(0.5 * eta, 0.2) is flat above eta = 0.4, where 76-93% of solved spawning APR
  demonstrations on the paper's problems sit; here min(0.3 * eta, 0.27) rises up to eta = 0.9, above
  every solved demonstration measured (eta at most 0.48 on the tiny problems, 0.85 on the paper's:
  bench/eta_range.py, bench/results.md), so shorter critical paths keep earning more.
- eta pays for width as much as for a short critical path: a tree that adds a child grows its eta even
  when its critical path grows too. `critical_path_tokens` (off by default) pays for the critical path's
  length itself, coef * (1 - L_cp / ref), so among correct trees the shorter one earns more, spawning or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from apr_ray.types import TreeRecord


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    correct_reward: float = Field(1.0, description="reward of a tree whose final answer passes the checker")
    incorrect_reward: float = Field(0.0, description="reward of any other tree (ThreadWeaver's code uses -1)")
    critical_path_enabled: bool = Field(True, description="add the ThreadWeaver acceleration bonus")
    critical_path_coef: float = Field(
        0.3, ge=0.0,
        description="rho: bonus = min(rho * eta, cap); the slope over the eta of correct parallel trees "
        "(ThreadWeaver: 0.5, flat above eta = 0.4)",
    )
    critical_path_cap: float = Field(
        0.27, ge=0.0,
        description="upper bound of the bonus, reached at eta = cap / coef (0.9 by default: above every solved "
        "solver demonstration, so only trees with > 90% of their tokens off the critical path gain no more)",
    )
    critical_path_tokens_coef: float = Field(
        0.0, ge=0.0,
        description="pay correct trees coef * max(0, 1 - critical path tokens / critical_path_tokens_ref): "
        "the critical path's length itself, not eta's ratio (which wider trees raise); 0: off",
    )
    critical_path_tokens_ref: int = Field(
        1024, ge=1, description="critical path tokens at which critical_path_tokens pays nothing"
    )
    critical_path_excess_coef: float = Field(
        0.0, ge=0.0,
        description="charge correct trees coef * max(0, critical path tokens / critical_path_excess_ref - 1): a "
        "cost of the critical path beyond a budget, none within it; 0: off",
    )
    critical_path_excess_ref: int = Field(
        448, ge=1, description="the critical path budget of critical_path_excess, in tokens (set it near the "
        "SFT model's: what the term holds the critical path to)"
    )
    token_cap: int | None = Field(
        None, ge=1, description="total generated tokens above which token_cap_penalty applies; None: off"
    )
    token_cap_penalty: float = Field(0.0, ge=0.0, description="subtracted once when tokens_total > token_cap")
    token_cost_per_1k: float = Field(
        0.0, ge=0.0, description="subtracted per 1,000 tokens the tree generated (all threads): the compute a "
        "tree spends, as a smooth cost where token_cap is a step; 0: off"
    )
    max_threads: int | None = Field(
        None, ge=1, description="logical threads (root included) allowed before thread_penalty; None: off"
    )
    thread_penalty: float = Field(0.0, ge=0.0, description="subtracted per thread beyond max_threads")


@dataclass
class RewardBreakdown:
    total: float
    terms: dict[str, float]  # every registered term, in registration order; sums to total


TermFn = Callable[[TreeRecord, RewardConfig], float]
REWARD_TERMS: dict[str, TermFn] = {}


def reward_term(name: str) -> Callable[[TermFn], TermFn]:
    def register(fn: TermFn) -> TermFn:
        if name in REWARD_TERMS:
            raise ValueError(f"reward term {name!r} is registered twice")
        REWARD_TERMS[name] = fn
        return fn

    return register


@reward_term("correct")
def correctness(tree: TreeRecord, cfg: RewardConfig) -> float:
    return cfg.correct_reward if tree.correct else cfg.incorrect_reward


def acceleration_ratio(tree: TreeRecord) -> float:
    """eta = 1 - L_cp / L_total: 0 for a sequential trace, towards 1 as work spreads over threads."""
    total, cp = tree.metrics.tokens_total, tree.metrics.tokens_critical_path
    if not 0 <= cp <= total:
        raise ValueError(
            f"tree {tree.problem_id!r}: tokens_critical_path={cp} must lie in [0, tokens_total={total}]"
        )
    return 0.0 if total == 0 else 1.0 - cp / total


@reward_term("critical_path")
def critical_path_bonus(tree: TreeRecord, cfg: RewardConfig) -> float:
    # Gated on correctness so that spreading wrong work over threads earns nothing.
    if not (cfg.critical_path_enabled and tree.correct):
        return 0.0
    return min(cfg.critical_path_coef * acceleration_ratio(tree), cfg.critical_path_cap)


@reward_term("critical_path_tokens")
def critical_path_tokens_bonus(tree: TreeRecord, cfg: RewardConfig) -> float:
    if not (cfg.critical_path_tokens_coef > 0 and tree.correct):
        return 0.0
    shortness = 1.0 - tree.metrics.tokens_critical_path / cfg.critical_path_tokens_ref
    return cfg.critical_path_tokens_coef * max(0.0, shortness)


@reward_term("critical_path_excess")
def critical_path_excess_cost(tree: TreeRecord, cfg: RewardConfig) -> float:
    if not (cfg.critical_path_excess_coef > 0 and tree.correct):
        return 0.0
    excess = tree.metrics.tokens_critical_path / cfg.critical_path_excess_ref - 1.0
    return -cfg.critical_path_excess_coef * max(0.0, excess)


@reward_term("token_cap")
def token_cap_penalty(tree: TreeRecord, cfg: RewardConfig) -> float:
    # The acceleration ratio can be gamed with long useless sibling threads; a total cap bounds that.
    if cfg.token_cap is None or tree.metrics.tokens_total <= cfg.token_cap:
        return 0.0
    return -cfg.token_cap_penalty


@reward_term("token_cost")
def token_cost(tree: TreeRecord, cfg: RewardConfig) -> float:
    return -cfg.token_cost_per_1k * tree.metrics.tokens_total / 1000


@reward_term("threads")
def thread_count_penalty(tree: TreeRecord, cfg: RewardConfig) -> float:
    if cfg.max_threads is None:
        return 0.0
    return -cfg.thread_penalty * max(0, tree.metrics.num_threads - cfg.max_threads)


def score_tree(tree: TreeRecord, cfg: RewardConfig) -> RewardBreakdown:
    terms = {name: fn(tree, cfg) for name, fn in REWARD_TERMS.items()}
    return RewardBreakdown(total=sum(terms.values()), terms=terms)
