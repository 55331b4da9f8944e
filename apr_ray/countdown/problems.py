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


def _values(a: int, b: int) -> tuple[int, ...]:
    """The values of `moves(a, b)` without their strings (the solvability test's hot loop)."""
    hi, lo = (b, a) if a <= b else (a, b)
    if lo != 0 and hi % lo == 0:
        return (a + b, a * b, hi - lo, hi // lo)
    return (a + b, a * b, hi - lo)


def _partners(target: int, x: int) -> tuple[int, ...] | None:
    """Every y with `target in _values(x, y)`; None when any y works (0 * y == 0).

    Inverting the last move turns "is target in x (op) R" into a few set look-ups in R.
    """
    if x == 0 and target == 0:
        return None
    out = [x + target, abs(target - x)]  # |x - y| == target, x + y == target
    if x != 0:
        out.append(x * target)  # y / x == target
        if target % x == 0:
            out.append(target // x)  # x * y == target
    if target != 0 and x % target == 0 and x != 0:
        out.append(x // target)  # x / y == target
    return tuple(out)


def _hit(target: int, x: int, values: frozenset[int] | tuple[int, ...]) -> bool:
    ys = _partners(target, x)
    return ys is None or any(y in values for y in ys)


@lru_cache(maxsize=4096)  # a random triple rarely repeats; a larger cache costs memory for ~no speed
def _triple(p: int, q: int, r: int) -> frozenset[int]:
    """Every value an expression over exactly p, q, r can take."""
    out: set[int] = set()
    for single, (u, v) in ((p, (q, r)), (q, (p, r)), (r, (p, q))):
        for w in _values(u, v):
            out.update(_values(single, w))
    return frozenset(out)


@lru_cache(maxsize=16)
def _halves(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Unordered splits of indices 0..n-1 into two non-empty parts (index 0 always in the first)."""
    out = []
    for mask in range(1 << (n - 1)):
        first = (0,) + tuple(i + 1 for i in range(n - 1) if mask >> i & 1)
        second = tuple(i for i in range(n) if i not in first)
        if second:
            out.append((first, second))
    return tuple(out)


@lru_cache(maxsize=1 << 12)
def _value_set(nums: tuple[int, ...]) -> frozenset[int]:
    """Every value an expression over exactly `nums` (sorted) can take; for 4 or more numbers."""
    if len(nums) <= 3:
        return frozenset(nums) if len(nums) == 1 else frozenset(_values(*nums)) if len(nums) == 2 else _triple(*nums)
    out: set[int] = set()
    for first, second in _halves(len(nums)):
        for x in _value_set(tuple(nums[i] for i in first)):
            for y in _value_set(tuple(nums[i] for i in second)):
                out.update(_values(x, y))
    return frozenset(out)


def _solvable_sorted(nums: tuple[int, ...], target: int) -> bool:
    n = len(nums)
    if n == 1:
        return nums[0] == target
    if n == 2:
        return target in _values(*nums)
    if n == 3:
        return target in _triple(*nums)
    if n == 4:
        a, b, c, d = nums
        if (_hit(target, a, _triple(b, c, d)) or _hit(target, b, _triple(a, c, d))
                or _hit(target, c, _triple(a, b, d)) or _hit(target, d, _triple(a, b, c))):
            return True
        for (p, q), (r, s) in (((a, b), (c, d)), ((a, c), (b, d)), ((a, d), (b, c))):
            rs = _values(r, s)
            if any(_hit(target, x, rs) for x in _values(p, q)):
                return True
        return False
    for first, second in _halves(n):
        small = _value_set(tuple(nums[i] for i in first))
        large = _value_set(tuple(nums[i] for i in second))
        if len(small) > len(large):
            small, large = large, small
        if any(_hit(target, x, large) for x in small):
            return True
    return False


def is_solvable(nums: tuple[int, ...] | list[int], target: int) -> bool:
    """Exhaustive search: can all numbers, each used once, be combined into exactly `target`?

    Any order of pairwise moves is an expression tree, so the last move combines the values of two
    complementary parts of the numbers: the test enumerates those splits, with the value sets of the
    parts (memoised) and the inverse of the last move. ~20x faster than a pairwise DFS for 4 numbers.
    """
    return _solvable_sorted(tuple(sorted(nums)), target)


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
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
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
    negative = {name: n for name, n in sizes.items() if n < 0}
    if negative:
        raise ValueError(f"split sizes must be >= 0, got {negative}")
    order = [s for s in ("val", "test", "train") if sizes.get(s, 0) > 0]
    problems = generate_problems(cfg, sum(sizes[s] for s in order), seed)
    out: dict[str, list[Problem]] = {}
    start = 0
    for split in order:
        out[split] = problems[start : start + sizes[split]]
        start += sizes[split]
    return out


def trivial_operator(problem: Problem) -> str | None:
    """The operator of a solution that needs no search, if there is one: every number combined with one
    operator, left to right in some order, under the move rules (so "-" means larger minus smaller at each
    step, "/" exact). A task on which such chains solve many problems tests recall, not search; the share
    of problems they solve is reported beside every accuracy."""
    from itertools import permutations

    for op in "+*-/":
        for order in set(permutations(problem.nums)):
            value: int | None = order[0]
            for n in order[1:]:
                hi, lo = max(value, n), min(value, n)
                value = {"+": value + n, "*": value * n, "-": hi - lo,
                         "/": hi // lo if lo and hi % lo == 0 else None}[op]
                if value is None:
                    break
            if value == problem.target:
                return op
    return None


def trivial_share(problems: list[Problem]) -> float:
    """The share of `problems` that `trivial_operator` solves."""
    return sum(trivial_operator(p) is not None for p in problems) / len(problems) if problems else 0.0
