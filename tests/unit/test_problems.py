"""Countdown problems: the move rules, solvability against an independent oracle, the generator's
ranges / de-duplication / reproducibility for several configs, disjoint splits, and clear errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from apr_ray.countdown.problems import (
    SPLITS,
    Problem,
    ProblemConfig,
    ProblemSpaceExhausted,
    generate_problems,
    generate_splits,
    is_solvable,
    moves,
)


def combos(a: int, b: int) -> set[int]:
    """The Countdown rules written out on their own: +, *, larger-smaller, exact larger/smaller."""
    lo, hi = sorted((a, b))
    out = {a + b, a * b, hi - lo}
    if lo != 0 and hi % lo == 0:
        out.add(hi // lo)
    return out


def reachable_values(nums: tuple[int, ...]) -> set[int]:
    """Every value an expression tree over all of `nums` (each used once) can take: split the index set
    in two, combine the values of both halves. A different algorithm from the generator's pairwise DFS."""
    n = len(nums)
    memo: dict[int, set[int]] = {}

    def values(mask: int) -> set[int]:
        if mask not in memo:
            if mask & (mask - 1) == 0:
                memo[mask] = {nums[mask.bit_length() - 1]}
            else:
                out: set[int] = set()
                sub = (mask - 1) & mask
                while sub:
                    rest = mask ^ sub
                    if sub < rest:
                        for x in values(sub):
                            for y in values(rest):
                                out |= combos(x, y)
                    sub = (sub - 1) & mask
                memo[mask] = out
        return memo[mask]

    return values((1 << n) - 1)


# --- move rules and solvability -------------------------------------------------------------------


@given(st.integers(0, 200), st.integers(0, 200))
def test_moves_follow_the_rules(a, b):
    out = moves(a, b)
    assert {value for value, _ in out} == combos(a, b)
    for value, op in out:
        assert value >= 0
        left, right = op.split("=")
        assert int(right) == value
        sym = next(s for s in "+-*/" if s in left)
        x, y = (int(v) for v in left.split(sym))
        assert {x, y} == {a, b}
        if sym in "-/":
            assert x >= y  # always larger first, so never negative and division is larger/smaller
        if sym == "/":
            assert y != 0 and x % y == 0 and x // y == value


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.lists(st.integers(0, 99), min_size=1, max_size=4),
        st.lists(st.integers(0, 12), min_size=5, max_size=5),
    ),
    st.data(),
)
def test_is_solvable_matches_expression_tree_oracle(nums, data):
    values = reachable_values(tuple(nums))
    # half the targets reachable by construction, the others anywhere (mostly unreachable)
    target = data.draw(st.one_of(st.sampled_from(sorted(values)), st.integers(0, 2000)))
    assert is_solvable(nums, target) == (target in values)
    assert is_solvable(list(reversed(nums)), target) == (target in values)


def test_is_solvable_examples():
    assert is_solvable([22, 26, 31, 53], 27)  # the reference's example: 53-31=22, 22/22=1, 26+1=27
    assert is_solvable((3, 5, 2), 16)  # (3+5)*2
    assert not is_solvable([1, 1, 1], 100)
    assert not is_solvable([2, 2, 2], 9)  # max 8: every number must be used
    assert not is_solvable([7, 3, 5], 3)  # 3 alone is not enough: all numbers must be used
    assert is_solvable([7], 7) and not is_solvable([7], 8)


# --- the generator -------------------------------------------------------------------------------

CONFIGS = {
    "default": ProblemConfig(),
    "3 operands": ProblemConfig(num_operands=3),
    "5 operands": ProblemConfig(num_operands=5),
    "small ranges": ProblemConfig(num_operands=3, num_min=1, num_max=9, target_min=1, target_max=20),
    "with zeros": ProblemConfig(num_operands=4, num_min=0, num_max=5, target_min=0, target_max=10),
}


def assert_valid(problems: list[Problem], cfg: ProblemConfig, count: int) -> None:
    assert len(problems) == count
    assert len({p.key for p in problems}) == count, "duplicates"
    for p in problems:
        assert len(p.nums) == cfg.num_operands
        assert all(cfg.num_min <= n <= cfg.num_max for n in p.nums)
        assert cfg.target_min <= p.target <= cfg.target_max
        assert is_solvable(p.nums, p.target)
        assert p.target in reachable_values(p.nums)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(CONFIGS)), st.integers(0, 2**32 - 1))
def test_generated_problems_are_solvable_distinct_and_in_range(name, seed):
    cfg = CONFIGS[name]
    problems = generate_problems(cfg, 8, seed)
    assert_valid(problems, cfg, 8)
    assert generate_problems(cfg, 8, seed) == problems  # reproducible from the seed


def test_six_operands():
    cfg = ProblemConfig(num_operands=6)
    problems = generate_problems(cfg, 3, seed=5)
    assert len(problems) == 3 and len({p.key for p in problems}) == 3
    for p in problems:
        assert len(p.nums) == 6 and all(1 <= n <= 99 for n in p.nums) and 10 <= p.target <= 100
        assert is_solvable(p.nums, p.target)


def test_seed_changes_the_problems():
    assert generate_problems(ProblemConfig(), 10, 1) != generate_problems(ProblemConfig(), 10, 2)


def test_small_space_is_deduplicated_to_exhaustion():
    # 3 numbers in 1..3 with targets 1..5: few distinct (sorted numbers, target) pairs exist
    cfg = ProblemConfig(num_operands=3, num_min=1, num_max=3, target_min=1, target_max=5)
    space = {
        (tuple(sorted((a, b, c))), t)
        for a in range(1, 4)
        for b in range(1, 4)
        for c in range(1, 4)
        for t in range(1, 6)
        if t in reachable_values((a, b, c))
    }
    problems = generate_problems(cfg, 20, seed=0)
    assert_valid(problems, cfg, 20)
    assert {p.key for p in problems} <= space
    with pytest.raises(ProblemSpaceExhausted, match="too small"):
        generate_problems(cfg, len(space) + 1, seed=0)


def test_same_numbers_in_another_order_are_one_problem():
    a, b = Problem(27, (22, 26, 31, 53)), Problem(27, (53, 31, 26, 22))
    assert a.key == b.key and a.problem_id == b.problem_id == "27:22,26,31,53"
    assert Problem(28, (22, 26, 31, 53)).key != a.key


def test_exclude_is_respected():
    cfg = CONFIGS["small ranges"]
    first = generate_problems(cfg, 30, seed=3)
    second = generate_problems(cfg, 30, seed=3, exclude={p.key for p in first})
    assert not {p.key for p in first} & {p.key for p in second}


# --- splits ------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(0, 10), st.integers(0, 10))
def test_splits_are_disjoint_sized_and_reproducible(seed, n_train, n_val, n_test):
    cfg = ProblemConfig(num_operands=3)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = generate_splits(cfg, sizes, seed)
    assert splits == generate_splits(cfg, sizes, seed)
    keys = {name: [p.key for p in splits.get(name, [])] for name in SPLITS}
    for name in SPLITS:
        assert len(keys[name]) == sizes[name]
        assert_valid(splits.get(name, []), cfg, sizes[name])
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])


def test_evaluation_splits_do_not_depend_on_train_size():
    cfg = ProblemConfig()
    small = generate_splits(cfg, {"train": 5, "val": 4, "test": 3}, seed=11)
    large = generate_splits(cfg, {"train": 40, "val": 4, "test": 3}, seed=11)
    assert small["val"] == large["val"] and small["test"] == large["test"]
    assert large["train"][:5] == small["train"]


# --- bad configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_operands": 2}, "num_operands"),
        ({"num_operands": 7}, "num_operands"),
        ({"num_min": 50, "num_max": 10}, "num_min"),
        ({"target_min": 90, "target_max": 20}, "target_min"),
        ({"num_min": -1}, "num_min"),
        ({"num_max": 10**6}, "num_max"),
        ({"operands": 4}, "operands"),  # a typo is rejected, not ignored
    ],
)
def test_bad_config_is_rejected_naming_the_field(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        ProblemConfig(**kwargs)


def test_unreachable_targets_raise_a_clear_error():
    cfg = ProblemConfig(num_operands=3, num_min=1, num_max=2, target_min=10, target_max=100)  # max is 8
    with pytest.raises(ProblemSpaceExhausted, match=r"num_min\.\.num_max"):
        generate_problems(cfg, 1, seed=0)


def test_unknown_split_is_rejected_by_name():
    with pytest.raises(ValueError, match="dev"):
        generate_splits(ProblemConfig(), {"train": 2, "dev": 1}, seed=0)


@pytest.mark.parametrize("call", ["splits", "count"])
def test_negative_sizes_are_rejected(call):
    with pytest.raises(ValueError, match=r"-3|train|count"):
        if call == "splits":
            generate_splits(ProblemConfig(), {"train": -3, "val": 2}, seed=0)
        else:
            generate_problems(ProblemConfig(), -3, seed=0)


def test_trivial_operator_chains():
    from apr_ray.countdown.problems import Problem, trivial_operator, trivial_share

    assert trivial_operator(Problem(21, (4, 7, 10))) == "+"
    assert trivial_operator(Problem(280, (4, 7, 10))) == "*"
    assert trivial_operator(Problem(1, (4, 7, 10))) == "-"  # 10-7=3, 4-3=1 (larger minus smaller)
    assert trivial_operator(Problem(2, (20, 5, 2))) == "/"  # 20/5=4, 4/2=2
    assert trivial_operator(Problem(38, (4, 7, 10))) is None  # 4*7+10 mixes operators: a search
    assert trivial_share([Problem(21, (4, 7, 10)), Problem(38, (4, 7, 10))]) == 0.5
