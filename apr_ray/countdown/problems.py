"""Countdown problems: the move rules, a solvability test, and a seeded, de-duplicated generator with
disjoint splits.

Defaults follow the APR reference (shared/research/apr.md §1): 4 numbers in 1..99, target in 10..100,
redraw the numbers until an exhaustive search reaches the target. Moves follow the reference's
`combine_nums`: a+b, a*b, larger-smaller, and larger/smaller only when exact, so every intermediate is
a non-negative integer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True, slots=True)
class Problem:
    target: int
    nums: tuple[int, ...]

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication: the same numbers in another order are the same problem."""
        return tuple(sorted(self.nums)), self.target

    @property
    def problem_id(self) -> str:
        return f"{self.target}:" + ",".join(str(n) for n in sorted(self.nums))


def moves(a: int, b: int) -> list[tuple[int, str]]:
    """Results of combining a and b, each with its operation string, in the reference's order."""
    out = [(a + b, f"{a}+{b}={a + b}"), (a * b, f"{a}*{b}={a * b}")]
    hi, lo = (b, a) if a <= b else (a, b)
    out.append((hi - lo, f"{hi}-{lo}={hi - lo}"))
    if lo != 0 and hi % lo == 0:
        out.append((hi // lo, f"{hi}/{lo}={hi // lo}"))
    return out


@lru_cache(maxsize=1 << 18)
def _reachable(nums: tuple[int, ...], target: int) -> bool:
    if len(nums) == 1:
        return nums[0] == target
    n = len(nums)
    for i in range(n):
        for j in range(i + 1, n):
            rest = nums[:i] + nums[i + 1 : j] + nums[j + 1 :]
            for value, _ in moves(nums[i], nums[j]):
                if _reachable(tuple(sorted(rest + (value,))), target):
                    return True
    return False


def is_solvable(nums: tuple[int, ...] | list[int], target: int) -> bool:
    """Exhaustive search: can all numbers, each used once, be combined into exactly `target`?"""
    return _reachable(tuple(sorted(nums)), target)


class ProblemConfig(BaseModel):
    """The problem distribution. Defaults: the APR paper's."""

    model_config = ConfigDict(extra="forbid")

    num_operands: int = Field(4, ge=3, le=6, description="how many numbers each problem gives")
    num_min: int = Field(1, ge=0, description="smallest input number")
    num_max: int = Field(99, ge=1, le=10_000, description="largest input number")
    target_min: int = Field(10, ge=0, description="smallest target")
    target_max: int = Field(100, ge=1, le=100_000, description="largest target")

    @model_validator(mode="after")
    def _ranges(self) -> ProblemConfig:
        if self.num_min > self.num_max:
            raise ValueError(f"num_min ({self.num_min}) > num_max ({self.num_max})")
        if self.target_min > self.target_max:
            raise ValueError(f"target_min ({self.target_min}) > target_max ({self.target_max})")
        return self


class ProblemSpaceExhausted(RuntimeError):
    pass


def _draw(cfg: ProblemConfig, rng: random.Random, max_redraws: int) -> Problem:
    """One solvable problem: pick a target, redraw the numbers until they reach it (reference scheme)."""
    target = rng.randint(cfg.target_min, cfg.target_max)
    for _ in range(max_redraws):
        nums = tuple(rng.randint(cfg.num_min, cfg.num_max) for _ in range(cfg.num_operands))
        if is_solvable(nums, target):
            return Problem(target, nums)
    raise ProblemSpaceExhausted(
        f"no solvable numbers found for target {target} in {max_redraws} draws; "
        f"widen num_min..num_max ({cfg.num_min}..{cfg.num_max}) or the target range"
    )


def generate_problems(
    cfg: ProblemConfig,
    count: int,
    seed: int,
    exclude: set[tuple[tuple[int, ...], int]] | None = None,
    max_redraws: int = 10_000,
) -> list[Problem]:
    """`count` distinct solvable problems, reproducible from `seed`, none of whose keys is in `exclude`."""
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set(exclude or ())
    out: list[Problem] = []
    misses = 0
    while len(out) < count:
        problem = _draw(cfg, rng, max_redraws)
        if problem.key in seen:
            misses += 1
            if misses > 100 * count + 1000:
                raise ProblemSpaceExhausted(
                    f"only {len(out)} distinct problems found of {count} requested; the space set by "
                    f"num_operands/num_min/num_max/target_min/target_max is too small"
                )
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


SPLITS = ("train", "val", "test")


def generate_splits(cfg: ProblemConfig, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Disjoint splits drawn from one de-duplicated stream, so no (numbers, target) pair is in two splits.

    Evaluation splits come first in the stream: their content then does not depend on the train size.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected some of {SPLITS}")
    order = [s for s in ("val", "test", "train") if sizes.get(s, 0) > 0]
    problems = generate_problems(cfg, sum(sizes[s] for s in order), seed)
    out: dict[str, list[Problem]] = {}
    start = 0
    for split in order:
        out[split] = problems[start : start + sizes[split]]
        start += sizes[split]
    return out
