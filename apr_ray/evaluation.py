"""Evaluation: roll out a fixed set of problems greedily and score the trees with the ladder.

Owns the evaluated problem set, the engine-side rollout for evaluation (`Evaluator.run_engine`, any
`engines.Engine`: the transformers engine in the plain script and during SFT) and the result
(`EvalResult`: ladder metrics, the trees, timing). The generator pool produces trees the same way in the
Ray trainer and hands them to `Evaluator.score`, so both paths report the same numbers. Must not import
Ray, MLflow or vLLM.
"""

from __future__ import annotations

import asyncio
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
    ) -> None:
        if not problems:
            raise ValueError("evaluation needs at least one problem")
        self.problems = list(problems)
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.runtime_cfg = runtime.model_copy(update={"sampling": sampling})
        self.max_concurrent_trees = max_concurrent_trees

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score(self, trees: Sequence[TreeRecord], wall_s: float = 0.0) -> EvalResult:
        if len(trees) != len(self.problems):
            raise ValueError(f"{len(trees)} trees for {len(self.problems)} evaluation problems")
        metrics = ladder.summarize(trees, self.decode) | {"wall_s": wall_s}
        return EvalResult(metrics, list(trees))

    def run_engine(self, engine: Engine) -> EvalResult:
        """Roll out every problem on `engine` in this thread (its own event loop)."""
        start = time.perf_counter()
        trees = asyncio.run(self._rollouts(engine))
        return self.score(trees, time.perf_counter() - start)

    async def _rollouts(self, engine: Engine) -> list[TreeRecord]:
        runtime = Runtime(engine, self.tokenizer, get_protocol(self.protocol), self.runtime_cfg)
        return await bounded_gather(
            (runtime.run_tree(p.target, p.nums, problem_id=p.problem_id, seed=i) for i, p in enumerate(self.problems)),
            self.max_concurrent_trees,
        )


def evaluate_model(evaluator: Evaluator, model: Any, max_batch_size: int = 64) -> EvalResult:
    """Evaluate a Hugging Face causal LM in this process with the transformers engine (its train / eval
    mode is restored afterwards)."""
    from apr_ray.rollout.engines import TransformersEngine

    was_training = model.training
    engine = TransformersEngine(model, eos_token_id=evaluator.tokenizer.eos_token_id,
                                pad_token_id=evaluator.tokenizer.pad_token_id, max_batch_size=max_batch_size)
    try:
        return evaluator.run_engine(engine)
    finally:
        model.train(was_training)
