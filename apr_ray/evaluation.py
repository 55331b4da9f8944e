"""Evaluation: roll out a fixed set of problems greedily and score the trees with the ladder; optionally
also sample several trees per problem of its first ones at the training distribution (T=1).

Greedy accuracy moves late and in steps of 1/problems; the sampled solve rate (correct share of the
samples, same problems, same seeds every evaluation) moves with every change of the policy, so it is the
earlier and steadier signal of RL progress (reported as `sampled_solved`, beside the greedy `solved`).

Owns the evaluated problem set, the engine-side rollout for evaluation (`Evaluator.run_engine`, any
`engines.Engine`: the transformers engine in the plain script and during SFT) and the result
(`EvalResult`: ladder metrics, the trees, timing). The generator pool produces trees the same way in the
Ray trainer and hands them to `Evaluator.score`, so both paths report the same numbers. Must not import
Ray, MLflow or vLLM.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from apr_ray import ladder
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import get_protocol
from apr_ray.rollout.engines import Engine, SamplingConfig
from apr_ray.rollout.runtime import Runtime, RuntimeConfig, bounded_gather
from apr_ray.types import TreeRecord

# Ladder rungs in the order they are expected to climb; the summary table prints them in this order.
LADDER_KEYS = ("threads_well_formed", "moves_from_state", "moves_correct_arithmetic", "solved", "spawn_share")


@dataclass
class EvalResult:
    metrics: dict[str, float]  # ladder.summarize keys + wall_s
    trees: list[TreeRecord] = field(repr=False)

    def line(self) -> str:
        """One line for logs: the ladder rungs and the mean tokens."""
        m = self.metrics
        rungs = "  ".join(f"{k} {m[k]:.3f}" for k in LADDER_KEYS)
        return f"{rungs}  tokens {m['tokens_total_mean']:.0f} (critical path {m['tokens_critical_path_mean']:.0f})"


class Evaluator:
    """Greedy rollouts of `problems` (always the same ones, in order) and their ladder metrics."""

    def __init__(
        self,
        problems: Sequence[Problem],
        tokenizer: Any,
        protocol: str,
        runtime: RuntimeConfig,
        sampling: SamplingConfig,
        max_concurrent_trees: int = 64,
        sampled_problems: int = 0,
        samples_per_problem: int = 4,
        sampled_seed: int = 0,
    ) -> None:
        if not problems:
            raise ValueError("evaluation needs at least one problem")
        self.problems = list(problems)
        # Sampled like the training rollouts (runtime.sampling), with a fixed seed: every evaluation draws
        # the same random numbers, so two evaluations differ by the policy, not by luck.
        self.sampled = self.problems[:sampled_problems]
        self.samples_per_problem = samples_per_problem
        self.sampled_sampling = runtime.sampling.model_copy(update={"seed": sampled_seed})
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.runtime_cfg = runtime.model_copy(update={"sampling": sampling})
        self.max_concurrent_trees = max_concurrent_trees

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, trees: Sequence[TreeRecord], wall_s: float = 0.0,
              sampled: Sequence[TreeRecord] = ()) -> EvalResult:
        if len(trees) != len(self.problems):
            raise ValueError(f"{len(trees)} trees for {len(self.problems)} evaluation problems")
        metrics = ladder.summarize(trees, self.decode) | {"wall_s": wall_s}
        if self.sampled:
            metrics |= self.score_sampled(sampled)
        return EvalResult(metrics, list(trees))

    def score_sampled(self, trees: Sequence[TreeRecord]) -> dict[str, float]:
        """`sampled_solved`: the correct share of the samples; `sampled_pass_any`: of the problems, the
        share with at least one correct sample."""
        k = self.samples_per_problem
        if len(trees) != len(self.sampled) * k:
            raise ValueError(f"{len(trees)} sampled trees for {len(self.sampled)} problems x {k} samples")
        groups = [trees[i : i + k] for i in range(0, len(trees), k)]
        return {"sampled_solved": sum(t.correct for t in trees) / len(trees),
                "sampled_pass_any": sum(any(t.correct for t in g) for g in groups) / len(groups)}

    def run_engine(self, engine: Engine) -> EvalResult:
        """Roll out every problem (and the sampled ones) on `engine` in this thread (its own event loop)."""
        start = time.perf_counter()
        trees = asyncio.run(roll_out(engine, self.tokenizer, self.protocol, self.runtime_cfg, self.problems, 1,
                                      self.max_concurrent_trees))
        sampled = asyncio.run(roll_out(engine, self.tokenizer, self.protocol,
                                       self.runtime_cfg.model_copy(update={"sampling": self.sampled_sampling}),
                                       self.sampled, self.samples_per_problem, self.max_concurrent_trees))
        return self.score(trees, time.perf_counter() - start, sampled)

    def run_pool(self, pool: Any) -> EvalResult:
        """The same on a generator pool (`pool.GeneratorPool`: anything with its `rollout`)."""
        start = time.perf_counter()
        trees, _ = pool.rollout(self.problems, 1, seed=0, sampling=self.runtime_cfg.sampling)
        sampled: list[TreeRecord] = []
        if self.sampled:
            sampled, _ = pool.rollout(self.sampled, self.samples_per_problem, seed=0, sampling=self.sampled_sampling)
        return self.score(trees, time.perf_counter() - start, sampled)

async def roll_out(engine: Engine, tokenizer: Any, protocol: str, runtime_cfg: RuntimeConfig,
                   problems: Sequence[Problem], k: int = 1, max_concurrent_trees: int = 64) -> list[TreeRecord]:
    """`k` trees per problem on `engine`, problem by problem; tree j of problem i has seed i * k + j."""
    runtime = Runtime(engine, tokenizer, get_protocol(protocol), runtime_cfg)
    return await bounded_gather(
        (runtime.run_tree(p.target, p.nums, problem_id=p.problem_id, seed=i * k + j)
         for i, p in enumerate(problems) for j in range(k)),
        max_concurrent_trees,
    )


def paired_difference(before: Sequence[bool], after: Sequence[bool]) -> tuple[float, float, float]:
    """Mean of after - before over the same problems, and its 95% interval (normal approximation of the
    per-problem differences, which is what makes two evaluations on one problem set comparable)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired difference needs two equal, non-empty lists, got {len(before)} and {len(after)}")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def evaluate_model(evaluator: Evaluator, model: Any, max_batch_size: int = 64) -> EvalResult:
    """Evaluate a Hugging Face causal LM in this process with the transformers engine (its train / eval
    mode is restored afterwards)."""
    from apr_ray.rollout.transformers_engine import TransformersEngine

    was_training = model.training
    engine = TransformersEngine(model, eos_token_id=evaluator.tokenizer.eos_token_id,
                                pad_token_id=evaluator.tokenizer.pad_token_id, max_batch_size=max_batch_size)
    try:
        return evaluator.run_engine(engine)
    finally:
        model.train(was_training)
