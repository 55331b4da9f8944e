"""The symbolic solvers over random problems and seeds: every SoS+ trace and every APR thread tree is
well-formed line by line, solved traces pass the checker and unsolved ones give no answer, and each APR
spawn / child prompt / join is exactly what the runtime's protocol would produce (one and two spawn
levels)."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import check_path, check_trace
from apr_ray.countdown.problems import Problem, ProblemConfig, generate_problems, is_solvable
from apr_ray.countdown.protocol import AprProtocol
from apr_ray.countdown.solvers import (
    Node,
    SolverConfig,
    ThreadDemo,
    mult_heuristic,
    path_to_goal,
    solve_apr,
    solve_sosp,
    sosp_prompt,
)

APR = AprProtocol()
NUM = r"\d+"
LIST = rf"\[(?:{NUM}(?:, {NUM})*)?\]"
OP = rf"{NUM}[+\-*/]{NUM}={NUM}"
NODE = rf"{NUM}(?:,{NUM})*"
SEARCH_LINES = [  # every line a solver may write (shared/research/apr.md §1)
    rf"Current State: {NUM}:{LIST}, Operations: \[(?:'{OP}'(?:, '{OP}')*)?\]",
    rf"Exploring Operation: {OP}, Resulting Numbers: {LIST}",
    rf"Generated Node #{NODE}: {NUM}:{LIST} Operation: {OP}",
    rf"{NUM},{NUM} unequal: No Solution",
    rf"({NUM}),\1 equal: Goal Reached",
    rf"Moving to Node #{NODE}",
    "No solution found.",
]
SOSP_LINES = SEARCH_LINES + [
    rf"Start Sub Search at level {NUM}: Moving to Node #{NODE}",
    rf"Exit Sub Search at level {NUM}",
    "No solution found in sub search",
]
APR_LINES = SEARCH_LINES + [
    re.escape(T.SPAWN_OPEN),
    re.escape(T.SPAWN_CLOSE),
    re.escape(T.JOIN_OPEN),
    re.escape(T.JOIN_CLOSE),
    rf"<Start Sub Search {NUM} at level {NUM}> Moving to Node #{NODE}",
    rf"<No Solution in Sub Search {NUM} at level {NUM} at Node #{NODE}>",
    rf"<Goal Reached in Sub Search {NUM} at level {NUM} at Node #{NODE}>",
]
SOSP_RE = re.compile("|".join(f"(?:{p})" for p in SOSP_LINES))
APR_RE = re.compile("|".join(f"(?:{p})" for p in APR_LINES))


@st.composite
def problems(draw, max_operands: int = 5) -> Problem:
    """Random problems, solvable or not: the solvers must behave on both."""
    n = draw(st.integers(3, max_operands))
    hi = draw(st.sampled_from([9, 30, 99]))
    nums = tuple(draw(st.lists(st.integers(1, hi), min_size=n, max_size=n)))
    return Problem(draw(st.integers(1, 100)), nums)


def assert_lines(text: str, pattern: re.Pattern) -> None:
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):
        assert pattern.fullmatch(line), f"unexpected line {line!r}"


def assert_answer(problem: Problem, final_text: str, solved: bool) -> None:
    """A solved trace's answer passes the checker; an unsolved one has none and ends the search."""
    answer = T.answer_path(final_text)
    assert (answer is not None) == solved
    if solved:
        result = check_trace(problem.target, problem.nums, final_text)
        assert result.ok, result.reason
        assert check_path(problem.target, problem.nums, answer).ok
        assert len(result.operations) == len(problem.nums) - 1
        assert is_solvable(problem.nums, problem.target)
    else:
        assert final_text.endswith(T.NO_SOLUTION + "\n")


# --- SoS+ ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_sosp_traces_are_well_formed_and_checked(problem, seed):
    trace, solved = solve_sosp(problem, SolverConfig(), random.Random(seed))
    assert trace.startswith(sosp_prompt(problem))
    assert_lines(trace, SOSP_RE)
    assert_answer(problem, trace, solved)
    assert trace.count("Start Sub Search at level") == trace.count("Exit Sub Search at level")
    assert solve_sosp(problem, SolverConfig(), random.Random(seed)) == (trace, solved)  # reproducible


def test_sosp_solves_many_reference_problems():
    problems_ = generate_problems(ProblemConfig(), 30, seed=0)
    solved = sum(solve_sosp(p, SolverConfig(), random.Random(i))[1] for i, p in enumerate(problems_))
    assert solved >= 6  # the reference's SoS+ demonstrations are ~half correct; 0 would mean a broken search


# --- APR ----------------------------------------------------------------------------------------


def check_thread(problem: Problem, thread: ThreadDemo, prompt: str, depth: int, cfg: SolverConfig) -> str:
    """Walk one thread with the runtime's protocol; return its final text."""
    assert thread.segments and len(thread.children) == len(thread.segments) - 1
    assert depth <= cfg.max_spawn_depth
    assert thread.segments[0].startswith(prompt)
    for k, segment in enumerate(thread.segments):
        assert_lines(segment, APR_RE)
        if k == len(thread.segments) - 1:
            assert APR.find_spawn(segment, depth, max_children=64) is None
            assert T.SPAWN_OPEN not in segment
            answer = T.answer_path(segment)
            assert (answer is not None) == thread.solved
            if thread.solved:
                assert answer.startswith(prompt)  # a thread's answer runs from its own start node
            else:
                assert segment.endswith(T.NO_SOLUTION + "\n")
            return segment
        assert depth < cfg.max_spawn_depth, "a thread at the maximum depth spawned"
        spawn = APR.find_spawn(segment, depth, max_children=64)
        assert spawn is not None and spawn.requested == len(spawn.children) == len(thread.children[k]) >= 2
        texts = []
        for spec, child in zip(spawn.children, thread.children[k]):
            # the child's first prompt is exactly what the runtime builds from the parent's lines
            assert child.segments[0][: len(spec.prompt)] == spec.prompt
            assert spec.prompt.count("\n") == 2
            texts.append(check_thread(problem, child, spec.prompt, depth + 1, cfg))
        joined = APR.join(spawn, depth, texts)
        assert thread.segments[k + 1].startswith(joined), "join does not reproduce the next segment's prefix"
        # the solver commits to the first successful child, so every segment but the last failed all
        if k + 1 < len(thread.segments) - 1:
            assert not any(c.solved for c in thread.children[k])
    raise AssertionError("unreachable")


def threads(demo: ThreadDemo):
    yield demo
    for group in demo.children:
        for child in group:
            yield from threads(child)


def depth_of(demo: ThreadDemo) -> int:
    return 1 + max((depth_of(c) for group in demo.children for c in group), default=-1)


@pytest.mark.parametrize("max_spawn_depth", [1, 2])
@settings(max_examples=40, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**32 - 1))
def test_apr_demos_follow_the_protocol(max_spawn_depth, problem, seed):
    cfg = SolverConfig(max_spawn_depth=max_spawn_depth)
    demo = solve_apr(problem, cfg, random.Random(seed))
    prompt = APR.root_prompt(problem.target, problem.nums)
    final = check_thread(problem, demo, prompt, 0, cfg)
    assert_answer(problem, final, demo.solved)
    assert depth_of(demo) <= max_spawn_depth
    again = solve_apr(problem, cfg, random.Random(seed))
    assert [t.segments for t in threads(again)] == [t.segments for t in threads(demo)]  # reproducible


@pytest.mark.parametrize("max_spawn_depth", [1, 2, 3])
def test_apr_on_generated_problems(max_spawn_depth):
    cfg = SolverConfig(max_spawn_depth=max_spawn_depth)
    demos = []
    for i, problem in enumerate(generate_problems(ProblemConfig(), 25, seed=7)):
        demo = solve_apr(problem, cfg, random.Random(i))
        final = check_thread(problem, demo, APR.root_prompt(problem.target, problem.nums), 0, cfg)
        assert_answer(problem, final, demo.solved)
        demos.append(demo)
    assert sum(d.solved for d in demos) >= 10
    assert any(d.children for d in demos)  # spawning happens (promising 0.9)
    # nesting happens exactly where it is allowed
    assert (max(depth_of(d) for d in demos) > 1) == (max_spawn_depth > 1)


@pytest.mark.parametrize("operands", [3, 6])
def test_apr_and_sosp_on_three_and_six_operands(operands):
    for i, problem in enumerate(generate_problems(ProblemConfig(num_operands=operands), 3, seed=operands)):
        cfg = SolverConfig()
        demo = solve_apr(problem, cfg, random.Random(i))
        assert_answer(problem, check_thread(problem, demo, APR.root_prompt(problem.target, problem.nums), 0, cfg),
                      demo.solved)
        trace, solved = solve_sosp(problem, cfg, random.Random(i))
        assert_answer(problem, trace, solved)


def test_unsolvable_problem_is_never_claimed():
    problem = Problem(100, (1, 1, 1, 1))
    for seed in range(5):
        assert not solve_sosp(problem, SolverConfig(), random.Random(seed))[1]
        demo = solve_apr(problem, SolverConfig(max_spawn_depth=2), random.Random(seed))
        assert not demo.solved and not any(t.solved for t in threads(demo))


@pytest.mark.parametrize("cfg", [SolverConfig(apr_promising=0.0), SolverConfig(apr_max_beam=1, apr_max_sub_beam=1)])
def test_apr_without_spawns_is_one_segment(cfg):
    for i, problem in enumerate(generate_problems(ProblemConfig(), 10, seed=3)):
        demo = solve_apr(problem, cfg, random.Random(i))
        assert len(demo.segments) == 1 and not demo.children
        assert T.SPAWN_OPEN not in demo.segments[0]


# --- pieces -------------------------------------------------------------------------------------


def test_mult_heuristic():
    # factors (>= 2) of 27: 3, 9, 27; 22 -> 5 (27), 26 -> 1 (27), 4 -> 1 (3), 9 -> 0
    assert mult_heuristic((22, 26, 4, 9), 27) == 7
    assert mult_heuristic((5,), 1) == 4  # no factor >= 2: distance to 1
    assert mult_heuristic((6, 7), 0) == 11  # target 0 (allowed by ProblemConfig) does not crash


def test_path_to_goal_needs_a_descendant():
    start = Node((1, 2), (), 0, None, "0")
    other = Node((3,), ("1+2=3",), 0, None, "1")
    with pytest.raises(ValueError, match="does not descend"):
        path_to_goal(other, start, 3)
    goal = Node((3,), ("1+2=3",), 0, start, "0,0")
    assert path_to_goal(goal, start, 3) == (
        "Moving to Node #0\nCurrent State: 3:[1, 2], Operations: []\n"
        "Exploring Operation: 1+2=3, Resulting Numbers: [3]\n3,3 equal: Goal Reached\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"sosp_max_beam": 0}, {"apr_promising": 1.5}, {"max_spawn_depth": 0}, {"max_spawn_depth": 5}, {"beam": 3},
     {"apr_min_beam": 11}],
)
def test_bad_solver_config_is_rejected(kwargs):
    with pytest.raises(ValidationError, match=next(iter(kwargs))):
        SolverConfig(**kwargs)


def test_a_fixed_beam_at_least_the_moves_of_a_three_number_root_explores_every_one_and_always_solves():
    # The root of a 3-number problem has at most 12 moves (3 pairs x +, *, -, exact /); its children hold
    # 2 numbers, whose every move a sub beam of 4 or more explores. So beams 12/12 are an exhaustive search.
    from apr_ray.countdown.problems import moves

    cfg = SolverConfig(apr_min_beam=12, apr_max_beam=12, apr_max_sub_beam=12, apr_promising=1.0,
                       apr_spawn_order="generated")
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=20, target_max=30), 100, seed=3)
    for seed, problem in enumerate(problems):
        demo = solve_apr(problem, cfg, random.Random(seed))
        nums = problem.nums
        root_moves = {op for i in range(3) for j in range(i + 1, 3) for _, op in moves(nums[i], nums[j])}
        explored = set(_explored_ops(demo.segments[0]))
        assert explored == root_moves or "Goal Reached" in demo.segments[0], (problem, explored ^ root_moves)
        final = check_thread(problem, demo, APR.root_prompt(problem.target, problem.nums), 0, cfg)
        assert demo.solved, problem
        assert_answer(problem, final, True)
    # the reference's draw U{1..10} prunes the root and leaves problems unsolved
    reference = SolverConfig(apr_spawn_order="generated")
    assert sum(not solve_apr(p, reference, random.Random(s)).solved for s, p in enumerate(problems)) > 0


def test_generated_spawn_order_lists_children_as_generated():
    import random
    import re

    from apr_ray.countdown.problems import Problem
    from apr_ray.countdown.solvers import SolverConfig, solve_apr

    cfg = SolverConfig(apr_spawn_order="generated", apr_promising=1.0)
    blocks = 0
    for seed in range(40):
        demo = solve_apr(Problem(24, (3, 7, 11, 5)), cfg, random.Random(seed))
        stack = [demo]
        while stack:
            thread = stack.pop()
            stack.extend(c for group in thread.children for c in group)
            for segment in thread.segments[:-1]:  # every segment but the last ends in a spawn block
                ids = re.findall(r"Moving to Node #([\d,]+)\n", segment.rsplit("<Calling Sub Searches>", 1)[1])
                last = [int(i.rsplit(",", 1)[1]) for i in ids]
                assert last == sorted(last) and len(set(ids)) == len(ids), ids
                blocks += 1
    assert blocks > 10


def _explored_ops(segment: str) -> list[str]:
    """The operations of the first node expanded in a thread segment (up to its first non-exploring line)."""
    ops = []
    for line in segment.splitlines()[2:]:  # "Moving to Node", "Current State"
        match = re.match(r"Exploring Operation: (\S+), Resulting Numbers", line)
        if match:
            ops.append(match.group(1))
        elif not (line.startswith("Generated Node") or re.fullmatch(r"\d+,\d+ (un)?equal: .*", line)):
            break
    return ops


@pytest.mark.parametrize("order", ["heuristic", "enumeration"])
def test_expand_order_writes_the_same_beam_in_a_fixed_order(order):
    from apr_ray.countdown.problems import moves

    problem = Problem(24, (3, 7, 11))
    nums = problem.nums
    enumeration = [op for i in range(3) for j in range(i + 1, 3) for _, op in moves(nums[i], nums[j])]
    for seed in range(30):
        ordered = solve_apr(problem, SolverConfig(expand_order=order), random.Random(seed)).segments[0]
        shuffled = solve_apr(problem, SolverConfig(), random.Random(seed)).segments[0]
        ops, reference_ops = _explored_ops(ordered), _explored_ops(shuffled)
        assert ops and len(set(ops)) == len(ops)
        if "Goal Reached" not in ordered and "Goal Reached" not in shuffled:
            assert sorted(ops) == sorted(reference_ops)  # the same beam, only the order differs
        if order == "enumeration":
            assert ops == sorted(ops, key=enumeration.index)
        else:
            values = [mult_heuristic(tuple(n for k, n in enumerate(nums) if k not in pair) + (v,), 24)
                      for v, pair in (_result(op, nums) for op in ops)]
            assert values == sorted(values)


def _result(op: str, nums: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    lhs, value = op.split("=")
    a, b = map(int, re.split(r"[+\-*/]", lhs))
    i = nums.index(a)
    j = next(k for k, n in enumerate(nums) if n == b and k != i)
    return int(value), (i, j)
