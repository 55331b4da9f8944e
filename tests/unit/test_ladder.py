"""The validation ladder: solver demonstrations replayed through the runtime score 100% on every rung;
hand-written threads give hand-counted moves; truncated / empty / badly ended threads are not well formed;
hostile text is read in bounded work and never raises; summaries of no trees are zeros, not NaN."""

import asyncio
import dataclasses
import random
import time

import pytest

from apr_ray.countdown import text as T
from apr_ray.countdown.demos import flatten_apr, flatten_sosp
from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.protocol import AprProtocol, SerialProtocol
from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp
from apr_ray.ladder import MAX_LINES, SUMMARY_KEYS, ThreadLadder, summarize, thread_ladder, tree_ladder
from apr_ray.rollout.engines import ReplayEngine, TextCodec
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import EndReason

EOS = EndReason.EOS
KEYS = {
    "threads_well_formed", "moves_from_state", "moves_correct_arithmetic", "moves_per_thread", "solved",
    "spawn_share", "threads_per_tree", "tokens_total_mean", "tokens_critical_path_mean", "num_trees",
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def decode(tok):
    return TextCodec(tok).decode


def replay(tok, demos, protocol, cfg):
    runtime = Runtime(ReplayEngine.from_demos(demos, tok), tok, protocol, cfg)

    async def all_trees():
        return await asyncio.gather(*(runtime.run_tree(d.problem.target, d.problem.nums) for d in demos))

    return asyncio.run(all_trees())


@pytest.fixture(scope="module")
def apr_run(tok):
    """Nested APR demonstrations with the budget condition, replayed through the runtime."""
    problems = generate_problems(ProblemConfig(), 20, seed=21)
    rng = random.Random(4)
    demos = [flatten_apr(p, solve_apr(p, SolverConfig(max_spawn_depth=2), rng), budget=5) for p in problems]
    cfg = RuntimeConfig(max_depth=2, max_children=64, context_window=100_000, max_tokens=100_000, budget=5)
    return demos, replay(tok, demos, AprProtocol(), cfg)


@pytest.fixture(scope="module")
def sosp_run(tok):
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=30, target_max=30), 30, seed=22)
    rng = random.Random(5)
    demos = [flatten_sosp(p, solve_sosp(p, SolverConfig(), rng)[0], budget=300) for p in problems]
    return demos, replay(tok, demos, SerialProtocol(), RuntimeConfig(context_window=100_000, budget=300))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# --- solver traces through the runtime: every rung at 100% ------------------------------------------


def test_apr_solver_trees_are_perfect_on_every_rung(apr_run, decode):
    demos, trees = apr_run
    s = summarize(trees, decode)
    assert set(s) == KEYS == set(SUMMARY_KEYS) and all(type(v) is float for v in s.values())
    assert s["threads_well_formed"] == 1.0
    assert s["moves_from_state"] == 1.0 and s["moves_correct_arithmetic"] == 1.0
    # the ladder's counts against the demonstrations themselves (no ladder code involved)
    moves = [sum(seq.completion.count("Exploring Operation: ") for seq in d.sequences) for d in demos]
    threads = [len({seq.thread_id for seq in d.sequences}) for d in demos]
    assert [tree_ladder(t, decode).moves for t in trees] == moves
    assert s["moves_per_thread"] == pytest.approx(sum(moves) / sum(threads))
    assert s["threads_per_tree"] == pytest.approx(mean(threads))
    assert s["solved"] == pytest.approx(mean(d.solved for d in demos)) and 0.0 < s["solved"] < 1.0
    assert s["spawn_share"] == pytest.approx(mean(d.spawns > 0 for d in demos)) and s["spawn_share"] > 0.0
    assert max(r.depth for t in trees for r in t.threads) == 2  # nested spawns were exercised
    assert s["tokens_total_mean"] == pytest.approx(mean(t.metrics.tokens_total for t in trees))
    assert s["tokens_critical_path_mean"] == pytest.approx(mean(t.metrics.tokens_critical_path for t in trees))
    assert s["num_trees"] == 20.0


def test_sosp_solver_trees_are_perfect_on_every_rung(sosp_run, decode):
    demos, trees = sosp_run
    assert decode(trees[0].threads[0].prompt_ids).startswith("Token Budget: 300 Current State: ")
    s = summarize(trees, decode)
    assert s["threads_well_formed"] == s["moves_from_state"] == s["moves_correct_arithmetic"] == 1.0
    assert s["solved"] == pytest.approx(mean(d.solved for d in demos)) and 0.0 < s["solved"] < 1.0
    assert s["spawn_share"] == 0.0 and s["threads_per_tree"] == 1.0
    moves = [d.sequences[0].completion.count("Exploring Operation: ") for d in demos]
    assert s["moves_per_thread"] == pytest.approx(mean(moves))


def test_whole_sosp_traces_with_their_condition_are_well_formed():
    """A solver's whole trace as one text (no prompt): its first line may carry the budget condition."""
    rng = random.Random(6)
    for p in generate_problems(ProblemConfig(), 30, seed=23):
        trace, _ = solve_sosp(p, SolverConfig(), rng)
        got = thread_ladder("", "Token Budget: 4096 " + trace, EOS)
        n = trace.count("Exploring Operation: ")
        assert got == ThreadLadder(trace.count("\n"), trace.count("\n"), n, n, n, True)


def test_spawn_share_and_tree_counts_over_mixed_trees(apr_run, sosp_run, decode):
    (_, apr_trees), (_, sosp_trees) = apr_run, sosp_run
    spawned = [t for t in apr_trees if t.metrics.num_spawns > 0][:2]
    trees = [*spawned, sosp_trees[0]]
    s = summarize(trees, decode)
    assert s["spawn_share"] == pytest.approx(2 / 3) and s["num_trees"] == 3.0
    sizes = [t.metrics.num_threads for t in spawned]
    assert min(sizes) > 1 and s["threads_per_tree"] == pytest.approx((sum(sizes) + 1) / 3)
    assert s["solved"] == pytest.approx(mean(t.correct for t in trees))


def test_truncated_runtime_threads_are_not_well_formed(tok, apr_run, decode):
    demos, _ = apr_run
    trees = replay(tok, demos[:10], AprProtocol(), RuntimeConfig(max_depth=2, max_tokens=60, budget=5,
                                                                 context_window=100_000))
    records = [r for t in trees for r in t.threads]
    cut = [r for r in records if r.end_reason is EndReason.MAX_TOKENS]
    assert cut and all(not thread_ladder(decode(r.prompt_ids), decode(r.output_ids), r.end_reason).well_formed
                       for r in cut)
    clean = mean(r.end_reason in (EndReason.EOS, EndReason.SPAWN) for r in records)
    assert summarize(trees, decode)["threads_well_formed"] == pytest.approx(clean) and clean < 1.0


# --- hand-written threads ------------------------------------------------------------------------

CHILD_PROMPT = "Moving to Node #0,1\nCurrent State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
CHILD_OUT = (
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"        # in the state (two 22s), right
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Exploring Operation: 31-22=9, Resulting Numbers: [22, 26, 9]\n"    # 31 is not in the state, right
    "Exploring Operation: 26+26=52, Resulting Numbers: [22, 22, 52]\n"  # only one 26 in the state, right
    "Exploring Operation: 26*22=570, Resulting Numbers: [22, 570]\n"    # in the state, wrong: 572
    "Exploring Operation: 22-26=4, Resulting Numbers: [22, 4]\n"        # in the state, negative: wrong
    "Exploring Operation: 26/22=1, Resulting Numbers: [22, 1]\n"        # in the state, inexact: wrong
    "26,27 unequal: No Solution\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 22+1=23, Resulting Numbers: [26, 23]\n"       # 22 left the state, right
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"           # in the state, right
    "27,27 equal: Goal Reached\n"
)


def test_hand_counted_moves():
    got = thread_ladder(CHILD_PROMPT, CHILD_OUT, EOS)
    assert got == ThreadLadder(lines=13, well_formed_lines=13, moves=8, moves_from_state=5, moves_correct=5,
                               well_formed=True)
    # without the prompt there is no state before the first state line of the output
    no_prompt = thread_ladder("", CHILD_OUT, EOS)
    assert (no_prompt.moves, no_prompt.moves_from_state, no_prompt.moves_correct) == (8, 1, 5)


def test_one_bad_line_breaks_the_thread_but_not_the_moves():
    bad = CHILD_OUT.replace("Moving to Node #0,1,0\n", "Moving to Node 0,1,0\n")
    got = thread_ladder(CHILD_PROMPT, bad, EOS)
    assert (got.lines, got.well_formed_lines, got.well_formed) == (13, 12, False)
    assert (got.moves, got.moves_from_state, got.moves_correct) == (8, 5, 5)
    unparsed = CHILD_OUT.replace("26+1=27, Resulting", "26+1=27 Resulting")
    got = thread_ladder(CHILD_PROMPT, unparsed, EOS)
    assert (got.well_formed_lines, got.moves, got.well_formed) == (12, 7, False)


@pytest.mark.parametrize("reason", [r for r in EndReason if r not in (EndReason.EOS, EndReason.SPAWN)])
def test_threads_not_ended_cleanly_are_not_well_formed(reason):
    got = thread_ladder(CHILD_PROMPT, CHILD_OUT, reason)
    assert got.well_formed_lines == got.lines == 13 and not got.well_formed


@pytest.mark.parametrize(
    "output",
    [
        "",  # EOS straight away: nothing to vouch for
        "\n\n",
        CHILD_OUT[:-12],  # cut inside the goal line
        CHILD_OUT.rsplit("Exploring", 1)[0],  # ends on a state line: the search stopped mid-way
        CHILD_OUT + "Exploring Operation: 1+1=2, Resulting Numbers: [2]\n",
    ],
)
def test_threads_that_do_not_end_on_an_ending_line_are_not_well_formed(output):
    assert not thread_ladder(CHILD_PROMPT, output, EOS).well_formed


def test_endings_and_spawn_and_join_lines():
    spawn = (
        "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
        "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
        + T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, 1, "0,0") + T.SPAWN_CLOSE + "\n"
    )
    root = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
    assert thread_ladder(root, spawn, EndReason.SPAWN) == ThreadLadder(5, 5, 1, 1, 1, True)
    assert thread_ladder(root, "No solution found.\n", EOS).well_formed
    join = (
        T.JOIN_OPEN + "\n" + T.join_no_solution_line(0, 1, "0,0") + T.join_goal_line(1, 1, "0,1")
        + "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n" + T.JOIN_CLOSE + "\n"
        + T.goal_line(27)
    )
    assert thread_ladder(root, join, EOS) == ThreadLadder(6, 6, 0, 0, 0, True)


def test_the_prompts_state_is_the_parents_not_its_childrens():
    """A continuation's prompt ends in the join block: its child paths do not move the parent's state."""
    prompt = (
        "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
        "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
        "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
        + T.JOIN_OPEN + "\n" + T.join_goal_line(0, 1, "0,1")
        + "Moving to Node #0,1,0\nCurrent State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
        + T.JOIN_CLOSE + "\n"
    )
    out = "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\nNo solution found.\n"
    assert thread_ladder(prompt, out, EOS).moves_from_state == 1
    # the same prompt without the join block: the child's state would be the last one
    assert thread_ladder(prompt.replace(T.JOIN_OPEN, "x"), out, EOS).moves_from_state == 0


def test_prefixes_only_where_the_format_has_them():
    text = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\nNo solution found.\n"
    for cond in ("Sub Call Budget: 5 ", "Token Budget: 4096 "):
        assert thread_ladder("", cond + text, EOS) == ThreadLadder(3, 3, 0, 0, 0, True)
        # only the thread's first line: when a prompt came first, the output's first line is not it
        assert thread_ladder(text, cond + text, EOS).well_formed_lines == 2
        assert thread_ladder("", text + cond + text, EOS).well_formed_lines == 5
    # the template regexes tolerate a prefix (for the condition); a well-formed line has none
    junk = "junk Moving to Node #0"
    assert T.MOVING_RE.match(junk) and T.STATE_RE.match("x" + text.split("\n")[1])
    assert thread_ladder("", junk + "\n" + text, EOS).well_formed_lines == 3
    assert T.MOVING_RE.match("Moving to Node #" + junk)
    assert thread_ladder("", "Moving to Node #" + junk + "\n" + text, EOS).well_formed_lines == 3
    doubled = "Current State: " + text.split("\n")[1] + "\nNo solution found.\n"
    assert thread_ladder("", doubled, EOS).well_formed_lines == 1


# --- hostile text ---------------------------------------------------------------------------------


def test_hostile_text_is_bounded_and_never_raises():
    rng = random.Random(7)
    alphabet = "0123456789[]:,'+-*/=#<> \nCurrent State: Exploring Operation: \x00\r\u00e9\U0001f600"
    garbage = "".join(rng.choice(alphabet) for _ in range(100_000))  # its time: bench/unit_timings.py
    for prompt, out in [
        (garbage, garbage),
        ("", "x" * 100_000),
        ("Current State: " * 20_000, "Current State: " * 20_000),
        ("(" * 50_000 + "Current State: 1:[1], Operations: []" + "\n" * 10, "\n" * 100_000),
        ("", "Exploring Operation: " + "9" * 100_000 + "+1=2, Resulting Numbers: [2]\n27,27 equal: Goal Reached\n"),
    ]:
        got = thread_ladder(prompt, out, EOS)
        assert 0 <= got.moves_correct <= got.moves <= got.lines <= MAX_LINES and not got.well_formed
    assert thread_ladder("", "x" * 100_000, EOS) == ThreadLadder(1, 0, 0, 0, 0, False)
    # more lines than the cap: only MAX_LINES are read, and the thread is not vouched for
    move = "Exploring Operation: 1+1=2, Resulting Numbers: [2]\n"
    many = thread_ladder("Current State: 2:[1, 1], Operations: []\n", (move + T.NO_SOLUTION + "\n") * 100_000, EOS)
    half = MAX_LINES // 2  # every line read is well formed, and the last one read is an ending
    assert many == ThreadLadder(MAX_LINES, MAX_LINES, half, half, half, False)
    exactly = thread_ladder("Current State: 2:[1, 1], Operations: []\n", (move + T.NO_SOLUTION + "\n") * half, EOS)
    assert exactly == ThreadLadder(MAX_LINES, MAX_LINES, half, half, half, True)


def test_numbers_past_the_digit_cap_do_not_parse():
    big = "9" * T.MAX_DIGITS
    ok = thread_ladder("", f"Exploring Operation: {big}*1={big}, Resulting Numbers: [{big}]\n", EOS)
    too_big = thread_ladder("", f"Exploring Operation: 9{big}*1=9{big}, Resulting Numbers: [9]\n", EOS)
    assert (ok.moves, ok.moves_correct) == (1, 1) and (too_big.moves, too_big.well_formed_lines) == (0, 0)


# --- empty input ------------------------------------------------------------------------------------


def test_no_trees_no_moves_give_zeros_not_nan(sosp_run, decode):
    assert summarize([], decode) == {k: 0.0 for k in KEYS}
    _, trees = sosp_run
    (rec,) = trees[0].threads
    empty = dataclasses.replace(trees[0], threads=[dataclasses.replace(rec, output_ids=[], logprobs=[])])
    s = summarize([empty], decode)
    assert s["moves_from_state"] == s["moves_correct_arithmetic"] == s["moves_per_thread"] == 0.0
    assert s["threads_well_formed"] == 0.0 and s["num_trees"] == 1.0
