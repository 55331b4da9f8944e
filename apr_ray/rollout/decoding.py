"""Decoding modes on the one runtime: APR trees, serial SoS+, self-consistency (cons@n), best-of-n (pass@n).

Owns the mode configuration, the per-problem result (answer, correctness, token counts over all
samples), and the cons@n vote. Must not import Ray, vLLM or torch: it drives `runtime.Runtime` on any
`engines.Engine`.

- `apr`: one APR thread tree (the `apr` protocol).
- `sosp`: one serial SoS+ thread (the `sosp` protocol; `budget` is its token-budget condition).
- `cons`: n serial samples; outputs without a well-formed answer path are dropped, the most frequent
  path (its operations, in order) wins, ties go to the earliest sample; correct if the winner passes the
  checker (APR paper's cons@n).
- `pass`: n serial samples; correct if any passes the checker (pass@n, best-of-n under the checker).
The n samples of a problem run concurrently on the engine, so a problem's latency is the slowest
sample's and its critical path the longest; its token count is the sum over samples.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import check_path
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import AprProtocol, SerialProtocol
from apr_ray.rollout.engines import Engine
from apr_ray.rollout.runtime import Runtime, RuntimeConfig, bounded_gather
from apr_ray.types import TreeRecord

Mode = Literal["apr", "sosp", "cons", "pass"]
MAX_PATH_LINES = 256  # as the checker's bound: a longer "path" is not well-formed


class DecodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("apr", description="apr | sosp | cons (majority of n SoS+ samples) | pass (any of n correct)")
    n: int = Field(1, ge=1, le=1024, description="samples per problem (cons and pass; 1 for apr and sosp)")
    max_concurrent_problems: int = Field(64, ge=1, description="problems decoded at once")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _n(self) -> DecodeConfig:
        if self.mode in ("apr", "sosp") and self.n != 1:
            raise ValueError(f"mode {self.mode!r} decodes one sample per problem; got n={self.n} (use cons or pass)")
        return self


@dataclass
class DecodeResult:
    problem: Problem
    mode: str
    trees: list[TreeRecord]  # one per sample
    answer: str | None  # the answer path the mode settles on
    correct: bool
    tokens_total: int  # generated tokens over all samples
    tokens_critical_path: int  # longest critical path among the samples (they run side by side)
    wall_s: float  # time to decode the problem (all samples)


def runtime_for(engine: Engine, tokenizer: Any, cfg: DecodeConfig) -> Runtime:
    protocol = AprProtocol() if cfg.mode == "apr" else SerialProtocol()
    return Runtime(engine, tokenizer, protocol, cfg.runtime)


def path_key(answer: str | None) -> tuple[str, ...] | None:
    """The vote key of an answer path: its operations in order, if the path is well-formed (every
    operation line parses and it ends in a goal line); None otherwise. The arithmetic is not checked."""
    if answer is None:
        return None
    ops: list[str] = []
    lines = answer.split("\n", MAX_PATH_LINES + 1)
    if len(lines) > MAX_PATH_LINES:
        return None
    for raw in lines:
        line = raw.strip()
        if line.startswith("Exploring Operation:"):
            m = T.EXPLORING_RE.match(line)
            if not m:
                return None
            ops.append(f"{m[1]}{m[2]}{m[3]}={m[4]}")
        elif T.GOAL_RE.match(line):
            return tuple(ops) if ops else None
    return None


def vote(answers: Sequence[str | None]) -> str | None:
    """cons@n: the most frequent well-formed answer path (by operations); ties to the earliest."""
    keyed = [(path_key(a), a) for a in answers]
    counts = Counter(k for k, _ in keyed if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for k, a in keyed if k is not None and counts[k] == best)


async def decode_problem(runtime: Runtime, problem: Problem, cfg: DecodeConfig, seed: int = 0) -> DecodeResult:
    """One problem in `cfg.mode`. Sample i of the problem uses tree seed `seed * cfg.n + i`."""
    start = time.perf_counter()
    trees = await bounded_gather(
        (runtime.run_tree(problem.target, problem.nums, problem_id=problem.problem_id, seed=seed * cfg.n + i)
         for i in range(cfg.n)),
        limit=cfg.n,
    )
    if cfg.mode == "cons":
        answer = vote([t.final_answer for t in trees])
        correct = answer is not None and check_path(problem.target, problem.nums, answer).ok
    elif cfg.mode == "pass":
        hit = next((t for t in trees if t.correct), None)
        answer = hit.final_answer if hit else next((t.final_answer for t in trees if t.final_answer), None)
        correct = hit is not None
    else:
        answer, correct = trees[0].final_answer, trees[0].correct
    return DecodeResult(
        problem=problem,
        mode=cfg.mode,
        trees=trees,
        answer=answer,
        correct=correct,
        tokens_total=sum(t.metrics.tokens_total for t in trees),
        tokens_critical_path=max(t.metrics.tokens_critical_path for t in trees),
        wall_s=time.perf_counter() - start,
    )


async def decode(
    engine: Engine, tokenizer: Any, problems: Sequence[Problem], cfg: DecodeConfig, seed: int = 0
) -> list[DecodeResult]:
    """Every problem in `cfg.mode`, `max_concurrent_problems` at a time; results in input order."""
    runtime = runtime_for(engine, tokenizer, cfg)
    return await bounded_gather(
        (decode_problem(runtime, p, cfg, seed=seed + i) for i, p in enumerate(problems)),
        limit=cfg.max_concurrent_problems,
    )
