"""Demonstrations as training sequences: flattening solver trees and reference trace_dicts, rejection of
corrupted demonstrations, the critical path of thread records (by hand and against the demo tree), the
tree record's JSON round trip, and the tokenizer's exact round trip on every prompt and completion."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr_ray.countdown import text as T
from apr_ray.countdown.demos import (
    DemoError,
    demo_from_trace_dict,
    flatten_apr,
    flatten_sosp,
    iter_threads,
)
from apr_ray.countdown.problems import Problem, ProblemConfig, generate_problems
from apr_ray.countdown.solvers import SolverConfig, ThreadDemo, solve_apr, solve_sosp
from apr_ray.types import (
    EndReason,
    ThreadRecord,
    TreeMetrics,
    TreeRecord,
    critical_path,
    tree_from_dict,
    tree_to_dict,
)

PROBLEMS = generate_problems(ProblemConfig(), 12, seed=21)


def to_trace_dict(demo: ThreadDemo) -> dict:
    """The reference's layout: main_calls = segments, sub_calls = children."""
    return {"main_calls": list(demo.segments), "sub_calls": [[to_trace_dict(c) for c in g] for g in demo.children]}


def demo_with_spawns(min_segments: int = 2, max_spawn_depth: int = 1) -> tuple[Problem, ThreadDemo]:
    cfg = SolverConfig(max_spawn_depth=max_spawn_depth)
    for seed in range(200):
        for problem in PROBLEMS:
            demo = solve_apr(problem, cfg, random.Random(seed))
            if len(demo.segments) >= min_segments:
                return problem, demo
    raise AssertionError("no demonstration with spawns found")


@st.composite
def apr_demos(draw):
    problem = PROBLEMS[draw(st.integers(0, len(PROBLEMS) - 1))]
    cfg = SolverConfig(max_spawn_depth=draw(st.integers(1, 2)))
    return problem, solve_apr(problem, cfg, random.Random(draw(st.integers(0, 2**32 - 1))))


# --- flattening -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(apr_demos(), st.sampled_from([None, 0, 10]))
def test_flatten_apr_sequences(problem_demo, budget):
    problem, demo = problem_demo
    flat = flatten_apr(problem, demo, budget=budget)
    threads = list(iter_threads(demo))
    assert len(flat.sequences) == sum(len(t.segments) for t in threads)
    assert flat.solved == demo.solved
    groups = [g for t in threads for g in t.children]
    assert flat.spawns == len(groups)
    assert flat.children_per_spawn == (sum(map(len, groups)) / len(groups) if groups else 0.0)
    # thread ids follow the depth-first order of the tree; each thread's requests are its segments in order
    by_thread: dict[int, list] = {}
    for seq in flat.sequences:
        by_thread.setdefault(seq.thread_id, []).append(seq)
    assert sorted(by_thread) == list(range(len(threads)))
    parent_of = {id(c): i for i, t in enumerate(threads) for g in t.children for c in g}
    condition = f"Sub Call Budget: {budget} " if budget is not None else ""
    for thread_id, seqs in by_thread.items():
        thread = threads[thread_id]
        assert [s.segment for s in seqs] == list(range(len(thread.segments)))
        assert {s.parent_thread_id for s in seqs} == {parent_of.get(id(thread), -1)}
        for seq, segment in zip(seqs, thread.segments):
            cond = condition if thread_id == 0 else ""
            assert seq.depth == (0 if thread_id == 0 else by_thread[seq.parent_thread_id][0].depth + 1)
            assert seq.prompt + seq.completion == cond + segment
            assert seq.prompt.startswith(cond) and seq.prompt.endswith("\n")
            assert T.JOIN_OPEN not in seq.completion  # the runtime writes join blocks, never the model
            if seq.segment > 0:
                assert seq.prompt.endswith(T.JOIN_CLOSE + "\n")
            if seq.segment < len(thread.segments) - 1:
                assert seq.completion.endswith(T.SPAWN_CLOSE + "\n")
    assert flat.sequences[0].prompt == condition + f"Moving to Node #0\nCurrent State: {problem.target}:" + \
        T.fmt_nums(problem.nums) + ", Operations: []\n"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, len(PROBLEMS) - 1), st.integers(0, 2**32 - 1), st.sampled_from([None, 512]))
def test_flatten_sosp(index, seed, budget):
    problem = PROBLEMS[index]
    trace, solved = solve_sosp(problem, SolverConfig(), random.Random(seed))
    flat = flatten_sosp(problem, trace, budget=budget)
    assert flat.solved == solved and flat.spawns == 0 and len(flat.sequences) == 1
    seq = flat.sequences[0]
    assert (seq.thread_id, seq.parent_thread_id, seq.depth, seq.segment) == (0, -1, 0, 0)
    cond = f"Token Budget: {budget} " if budget is not None else ""
    assert seq.prompt == cond + T.state_line(problem.target, problem.nums, [])
    assert seq.prompt + seq.completion == cond + trace


@settings(max_examples=20, deadline=None)
@given(apr_demos())
def test_reference_trace_dict_round_trip(problem_demo):
    problem, demo = problem_demo
    parsed = demo_from_trace_dict(json.loads(json.dumps(to_trace_dict(demo))))
    assert to_trace_dict(parsed) == to_trace_dict(demo)
    assert flatten_apr(problem, parsed).sequences == flatten_apr(problem, demo).sequences


# --- corrupted demonstrations ---------------------------------------------------------------------


def test_corrupted_apr_demos_are_rejected_with_where():
    problem, demo = demo_with_spawns(min_segments=2)
    kids = demo.children[0]

    def rejects(bad: ThreadDemo, words: str, target: Problem = problem) -> None:
        with pytest.raises(DemoError, match=words):
            flatten_apr(target, bad)

    rejects(ThreadDemo(["X" + demo.segments[0]] + demo.segments[1:], demo.children),
            r"main_calls\[0\].*expected prompt")
    rejects(ThreadDemo(demo.segments[:1] + ["X" + s for s in demo.segments[1:]], demo.children),
            r"main_calls\[1\].*expected prompt")
    rejects(ThreadDemo(demo.segments, [kids[:-1]] + demo.children[1:]), r"sub_calls\[0\]: \d+ sub calls for \d+")
    rejects(ThreadDemo(demo.segments, demo.children[:-1]), "sub-call groups")
    rejects(ThreadDemo(demo.segments[:1], []), "last call must not spawn")
    bad_level = demo.segments[0].replace("at level 1>", "at level 2>")
    rejects(ThreadDemo([bad_level] + demo.segments[1:], demo.children), "level 2, expected 1")
    # a child's text that does not start with the prompt the runtime would give it
    wrong_child = ThreadDemo(["Moving to Node #0,99\n" + kids[0].segments[0]], [])
    rejects(ThreadDemo(demo.segments, [[wrong_child] + kids[1:]] + demo.children[1:]),
            r"trace_dict\.sub_calls\[0\]\[0\]\.main_calls\[0\]")
    # the same demonstration does not belong to another problem
    other = next(p for p in PROBLEMS if p != problem)
    rejects(demo, "expected prompt", other)


def test_non_spawning_call_followed_by_sub_calls_is_rejected():
    problem = PROBLEMS[0]
    single = solve_apr(problem, SolverConfig(apr_promising=0.0), random.Random(0))
    with pytest.raises(DemoError, match="must end in a spawn block"):
        flatten_apr(problem, ThreadDemo(single.segments * 2, [[]]))


def test_fake_goal_claims_fail_the_checker():
    problem = Problem(100, (1, 1, 1, 1))  # unsolvable
    demo = solve_apr(problem, SolverConfig(), random.Random(0))
    fake = demo.segments[-1] + "100,100 equal: Goal Reached\n100,100 equal: Goal Reached\n"
    with pytest.raises(DemoError, match="fails the checker"):
        flatten_apr(problem, ThreadDemo(demo.segments[:-1] + [fake], demo.children))
    trace, _ = solve_sosp(problem, SolverConfig(), random.Random(0))
    with pytest.raises(DemoError, match="fails the checker"):
        flatten_sosp(problem, trace + "100,100 equal: Goal Reached\n100,100 equal: Goal Reached\n")
    with pytest.raises(DemoError, match="does not start with"):
        flatten_sosp(problem, "Token Budget: 5 " + trace)


def nested(depth: int) -> dict:
    return {"main_calls": ["x"], "sub_calls": [] if depth == 0 else [[nested(depth - 1)]]}


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ([], "got list"),
        ({"sub_calls": []}, r"main_calls: expected a non-empty list"),
        ({"main_calls": []}, r"main_calls: expected a non-empty list"),
        ({"main_calls": ["a", 3]}, r"main_calls: expected a non-empty list of strings"),
        ({"main_calls": ["a", "b"], "sub_calls": [{"main_calls": ["c"]}]}, r"sub_calls: expected a list of lists"),
        ({"main_calls": ["a", "b"], "sub_calls": [[{"main_calls": "c"}]]},
         r"trace_dict\.sub_calls\[0\]\[0\]\.main_calls"),
        (nested(12), "deeper than 8"),
    ],
)
def test_bad_trace_dicts_are_rejected_with_where(obj, words):
    with pytest.raises(DemoError, match=words):
        demo_from_trace_dict(obj)


# --- critical path and tree records (apr_ray/types.py) --------------------------------------------


def rec(request_id, thread_id, parent, segment, tokens, spawned=(), depth=0):
    return ThreadRecord(
        request_id=request_id, thread_id=thread_id, parent_thread_id=parent, depth=depth, segment=segment,
        prompt_ids=[1, 2], output_ids=[7] * tokens, logprobs=[-0.5] * tokens,
        end_reason=EndReason.SPAWN if spawned else EndReason.EOS, spawned_thread_ids=list(spawned),
    )


def test_critical_path_root_with_two_segments_and_three_children():
    # root: 10 tokens, spawns 3 children (5, 20, 7 tokens), then 8 tokens: 10 + 20 + 8
    records = [
        rec(0, 0, -1, 0, 10, spawned=[1, 2, 3]),
        rec(1, 1, 0, 0, 5, depth=1),
        rec(2, 2, 0, 0, 20, depth=1),
        rec(3, 3, 0, 0, 7, depth=1),
        rec(4, 0, -1, 1, 8),
    ]
    assert critical_path(records) == (38, [0, 2, 4])
    assert critical_path(list(reversed(records))) == (38, [0, 2, 4])  # order of records does not matter


def test_critical_path_nested():
    # root seg0 (4) spawns t1, t2; t1: seg0 (3) spawns t3 (10), t4 (2), then seg1 (5) -> 18; t2: 15
    # root seg1 (6) spawns t5 (9); root seg2 (1).  4 + 18 + 6 + 9 + 1 = 38
    records = [
        rec(0, 0, -1, 0, 4, spawned=[1, 2]),
        rec(1, 1, 0, 0, 3, spawned=[3, 4], depth=1),
        rec(2, 3, 1, 0, 10, depth=2),
        rec(3, 4, 1, 0, 2, depth=2),
        rec(4, 1, 0, 1, 5, depth=1),
        rec(5, 2, 0, 0, 15, depth=1),
        rec(6, 0, -1, 1, 6, spawned=[5]),
        rec(7, 5, 0, 0, 9, depth=1),
        rec(8, 0, -1, 2, 1),
    ]
    random.Random(0).shuffle(records)
    assert critical_path(records) == (38, [0, 1, 2, 4, 6, 7, 8])


def test_critical_path_edges():
    assert critical_path([]) == (0, [])
    assert critical_path([rec(0, 0, -1, 0, 12)]) == (12, [0])
    # a spawned child whose record is missing (e.g. never started) adds nothing
    assert critical_path([rec(0, 0, -1, 0, 3, spawned=[9]), rec(1, 0, -1, 1, 4)]) == (7, [0, 1])
    with pytest.raises(ValueError, match="deeper than 64"):  # a corrupted file that spawns itself
        critical_path([rec(0, 0, -1, 0, 1, spawned=[1]), rec(1, 1, 0, 0, 1, spawned=[1])])


@settings(max_examples=25, deadline=None)
@given(apr_demos())
def test_critical_path_of_a_demo_tree(problem_demo):
    """Records built from a flattened demo give the critical path computed on the demo tree itself."""
    problem, demo = problem_demo
    flat = flatten_apr(problem, demo)
    threads = list(iter_threads(demo))
    index = {id(t): i for i, t in enumerate(threads)}
    records, request_of = [], {}
    for i, seq in enumerate(flat.sequences):
        thread = threads[seq.thread_id]
        spawned = [index[id(c)] for c in thread.children[seq.segment]] if seq.segment < len(thread.children) else []
        records.append(rec(i, seq.thread_id, seq.parent_thread_id, seq.segment, len(seq.completion), spawned))
        request_of[(seq.thread_id, seq.segment)] = (i, len(seq.completion))

    def chain(thread: ThreadDemo) -> tuple[int, list[int]]:
        length, path = 0, []
        for k in range(len(thread.segments)):
            request, tokens = request_of[(index[id(thread)], k)]
            length, path = length + tokens, path + [request]
            if k < len(thread.children):
                best = max((chain(c) for c in thread.children[k]), key=lambda c: c[0])
                length, path = length + best[0], path + best[1]
        return length, path

    assert critical_path(records) == chain(demo)
    total = sum(len(s.completion) for s in flat.sequences)
    assert critical_path(records)[0] <= total
    if demo.children:
        assert critical_path(records)[0] < total


def test_tree_record_json_round_trip():
    records = [rec(0, 0, -1, 0, 3, spawned=[1]), rec(1, 1, 0, 0, 2, depth=1), rec(2, 0, -1, 1, 4)]
    records[1].end_reason = EndReason.MAX_TOKENS
    records[1].detail = "hit max_tokens=2"
    records[1].start_s, records[1].end_s = 0.125, 1e-7
    tree = TreeRecord(
        target=27, nums=[22, 26, 31, 53], threads=records,
        metrics=TreeMetrics(tokens_total=9, tokens_critical_path=9, num_threads=2, num_requests=3, num_spawns=1,
                            max_context=11, wall_s=0.3),
        final_answer="Moving to Node #0\n", correct=False, check_reason="numbers left unused",
        policy_version=4, problem_id="27:22,26,31,53",
    )
    data = json.loads(json.dumps(tree_to_dict(tree)))
    assert [t["end_reason"] for t in data["threads"]] == ["spawn", "max_tokens", "eos"]
    back = tree_from_dict(data)
    assert back == tree
    assert isinstance(back.threads[1].end_reason, EndReason)
    assert critical_path(back.threads) == critical_path(tree.threads)
    with pytest.raises(ValueError, match="'stalled'"):
        tree_from_dict({**data, "threads": [{**data["threads"][0], "end_reason": "stalled"}]})
    with pytest.raises(KeyError, match="metrics"):
        tree_from_dict({k: v for k, v in data.items() if k != "metrics"})


# --- tokenizer round trip -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer_module = pytest.importorskip("apr_ray.tokenizer")
    return tokenizer_module.build_tokenizer()


def test_tokenizer_round_trips_every_prompt_and_completion(tokenizer):
    texts = []
    for i, problem in enumerate(PROBLEMS[:6]):
        demo = solve_apr(problem, SolverConfig(max_spawn_depth=2), random.Random(i))
        texts += [(s.prompt, s.completion) for s in flatten_apr(problem, demo, budget=i).sequences]
        trace, _ = solve_sosp(problem, SolverConfig(), random.Random(i))
        texts += [(s.prompt, s.completion) for s in flatten_sosp(problem, trace, budget=512).sequences]
    assert len(texts) > 12
    for prompt, completion in texts:
        for text in (prompt, completion):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
        # prompts end at a line boundary: their ids plus the completion's are the whole text's ids
        assert tokenizer.encode(prompt, add_special_tokens=False) + tokenizer.encode(
            completion, add_special_tokens=False
        ) == tokenizer.encode(prompt + completion, add_special_tokens=False)
