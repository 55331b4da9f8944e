"""The thread-tree runtime: replaying solver demonstrations thread by thread (nested spawns, budget
conditioning, SoS+), the reference example's spawn/join by hand, every limit and malformed output ending
its thread with the right reason while the tree finishes, timeouts cancelling outstanding requests,
request seeds, the decoding modes (cons@n vote, pass@n), the problem batch columns, and the generator's
weight-update gate (without Ray)."""

import asyncio
import functools
import random

import pytest

from apr_ray.countdown import text as T
from apr_ray.countdown.demos import flatten_apr, flatten_sosp
from apr_ray.countdown.problems import Problem, ProblemConfig, generate_problems
from apr_ray.countdown.protocol import AprProtocol, SerialProtocol
from apr_ray.countdown.solvers import SolverConfig, ThreadDemo, solve_apr, solve_sosp
from apr_ray.rollout.decoding import DecodeConfig, decode, path_key, vote
from apr_ray.rollout.engines import Engine, GenerationResult, ReplayEngine, SamplingConfig, TextCodec, request_seed
from apr_ray.rollout.generator import GeneratorConfig, GeneratorImpl, problems_to_batch
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import EndReason, critical_path

APR = AprProtocol()

# The APR reference's example (shared/research/apr.md §1), as in tests/unit/test_protocol.py.
PROBLEM = Problem(27, (22, 26, 31, 53))
ROOT_PROMPT = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
EXPAND = (
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
)
SPAWN = (
    "<Calling Sub Searches>\n"
    "<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
    "<Start Sub Search 1 at level 1> Moving to Node #0,1\n"
    "<End Calling Sub Searches>\n"
)
CHILD_0_PROMPT = "Moving to Node #0,0\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
CHILD_1_PROMPT = "Moving to Node #0,1\nCurrent State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
CHILD_0_OUT = (
    "Exploring Operation: 31-31=0, Resulting Numbers: [26, 0]\n"
    "Generated Node #0,0,0: 27:[26, 0] Operation: 31-31=0\n"
    "Moving to Node #0,0,0\n"
    "Current State: 27:[26, 0], Operations: ['53-22=31', '31-31=0']\n"
    "Exploring Operation: 26+0=26, Resulting Numbers: [26]\n"
    "26,27 unequal: No Solution\n"
    "No solution found.\n"
)
CHILD_1_PATH = (
    "Moving to Node #0,1\n"
    "Current State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
)
CHILD_1_OUT = CHILD_1_PATH[len(CHILD_1_PROMPT):] + "27,27 equal: Goal Reached\n" + CHILD_1_PATH
JOINED = ROOT_PROMPT + EXPAND + (
    "<Sub Searches>\n"
    "<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
    "<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n"
) + CHILD_1_PATH + "<End Sub Searches>\n"
ROOT_PATH = (
    ROOT_PROMPT
    + "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    + "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
    + CHILD_1_PATH
)
FINAL_OUT = "27,27 equal: Goal Reached\n" + ROOT_PATH


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class TextEngine(Engine):
    """Answers each prompt (decoded, BOS dropped) with `respond(prompt, seed)`: output text (EOS appended),
    an exception to raise, or ("sleep", seconds, text). Counts requests in flight and cancellations."""

    def __init__(self, tok, respond):
        self.codec = TextCodec(tok)
        self.eos_token_id = tok.eos_token_id
        self.respond = respond
        self.prompts: list[str] = []
        self.seeds: list[int | None] = []
        self.in_flight = self.max_in_flight = self.cancelled = 0

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        prompt = self.codec.decode(prompt_ids)
        self.prompts.append(prompt)
        self.seeds.append(sampling.seed)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            out = self.respond(prompt, sampling.seed)
            delay = 0.0
            if isinstance(out, tuple):
                _, delay, out = out
            if isinstance(out, Exception):
                raise out
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        ids = [*self.codec.encode(out), self.eos_token_id]
        finish = "eos"
        if len(ids) > max_new_tokens:
            ids, finish = ids[:max_new_tokens], "length"
        return GenerationResult(ids, [-0.5] * len(ids), finish)


def reference_respond(overrides=None):
    """The reference example: the root spawns two children, child 1 finds the goal, the root finishes."""
    answers = {ROOT_PROMPT: EXPAND + SPAWN, CHILD_0_PROMPT: CHILD_0_OUT, CHILD_1_PROMPT: CHILD_1_OUT, JOINED: FINAL_OUT}
    answers.update(overrides or {})

    def respond(prompt, seed):
        if prompt in answers:
            return answers[prompt]
        if T.JOIN_OPEN in prompt:
            return "No solution found.\n"
        raise KeyError(prompt[:80])

    return respond


def run(runtime, problem=PROBLEM, **kw):
    return asyncio.run(runtime.run_tree(problem.target, problem.nums, **kw))


def by_thread(tree):
    return {(r.thread_id, r.segment): r for r in tree.threads}


# --- replaying solver demonstrations -------------------------------------------------------------


def check_replay(tok, problems, solver_cfg, runtime_cfg, budget=None, seed=0):
    """Run every problem on a ReplayEngine holding its demonstration; compare thread by thread."""
    rng = random.Random(seed)
    codec = TextCodec(tok)
    trees_demo = [solve_apr(p, solver_cfg, rng) for p in problems]
    demos = [flatten_apr(p, d, budget=budget) for p, d in zip(problems, trees_demo)]
    engine = ReplayEngine.from_demos(demos, tok)
    runtime = Runtime(engine, tok, APR, runtime_cfg)

    async def all_trees():
        return await asyncio.gather(*(runtime.run_tree(p.target, p.nums, problem_id=p.problem_id) for p in problems))

    trees = asyncio.run(all_trees())
    count = functools.lru_cache(maxsize=None)(lambda text: len(codec.encode(text)))
    assert engine.requests == sum(len(d.sequences) for d in demos)
    for problem, thread_demo, demo, tree in zip(problems, trees_demo, demos, trees):
        # every request: the same prompt and completion, token ids round-tripping exactly
        got = {}
        for r in tree.threads:
            assert r.prompt_ids[0] == tok.bos_token_id and r.output_ids[-1] == tok.eos_token_id
            assert r.logprobs == [0.0] * len(r.output_ids)
            assert r.end_reason in (EndReason.EOS, EndReason.SPAWN) and r.detail in ("",)
            got[codec.decode(r.prompt_ids)] = (r, codec.decode(r.output_ids[:-1]))
        want = {s.prompt: s for s in demo.sequences}
        assert set(got) == set(want), problem
        ids_of = {r.thread_id: codec.decode(r.prompt_ids) for r in tree.threads if r.segment == 0}
        first_prompt = {}
        for s in demo.sequences:
            if s.segment == 0:
                first_prompt[s.thread_id] = s.prompt
        for prompt, s in want.items():
            r, completion = got[prompt]
            assert completion == s.completion  # (the prompt ids matched the engine's key: encode(prompt))
            assert (r.depth, r.segment) == (s.depth, s.segment)
            # the same thread structure: the parent is the thread whose first prompt is the demo parent's
            parent_prompt = ids_of.get(r.parent_thread_id)
            assert parent_prompt == first_prompt.get(s.parent_thread_id)
        # the answer and its correctness
        assert tree.correct == demo.solved
        final = max((r for r in tree.threads if r.thread_id == 0), key=lambda r: r.segment)
        root_text = codec.decode(final.prompt_ids) + codec.decode(final.output_ids[:-1])
        assert tree.final_answer == T.answer_path(root_text)
        assert (tree.final_answer is not None) == demo.solved
        # metrics against the demonstration tree itself
        assert tree.metrics.num_spawns == demo.spawns
        assert tree.metrics.num_threads == len({s.thread_id for s in demo.sequences})
        assert tree.metrics.tokens_total == sum(count(s.completion) + 1 for s in demo.sequences)
        assert tree.metrics.tokens_critical_path == demo_critical_path(thread_demo, count)
        assert tree.problem_id == problem.problem_id
    return trees


def demo_critical_path(demo: ThreadDemo, count) -> int:
    """Longest causal chain of a demonstration tree in tokens (each completion + EOS), from the demo alone.

    Segment 0's prompt is the thread's first two lines; segment k's runs to the end of its join block.
    """
    total = 0
    for k, segment in enumerate(demo.segments):
        if k == 0:
            prompt_end = segment.index("\n", segment.index("\n") + 1) + 1
        else:
            prompt_end = segment.rfind(T.JOIN_CLOSE + "\n") + len(T.JOIN_CLOSE) + 1
        total += count(segment[prompt_end:]) + 1
        if k < len(demo.children):
            total += max(demo_critical_path(child, count) for child in demo.children[k])
    return total


def test_replay_reproduces_nested_demonstrations_thread_by_thread(tok):
    problems = generate_problems(ProblemConfig(), 100, seed=11)
    trees = check_replay(tok, problems, SolverConfig(max_spawn_depth=2),
                         RuntimeConfig(max_depth=2, max_children=64, context_window=100_000, max_tokens=100_000))
    assert max(r.depth for t in trees for r in t.threads) == 2  # nested spawns were exercised
    assert sum(t.correct for t in trees) > 25 and sum(not t.correct for t in trees) > 0


def test_replay_with_budget_condition_and_small_problems(tok):
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=30, target_max=30), 200, seed=12)
    trees = check_replay(tok, problems, SolverConfig(), RuntimeConfig(budget=5, context_window=100_000), budget=5)
    assert sum(t.metrics.num_spawns for t in trees) > 100
    root = next(r for r in trees[0].threads if r.thread_id == 0)
    assert TextCodec(tok).decode(root.prompt_ids).startswith("Sub Call Budget: 5 Moving to Node #0\n")
    child = next((r for t in trees for r in t.threads if r.depth == 1), None)
    assert child is not None and "Budget" not in TextCodec(tok).decode(child.prompt_ids)


def test_replay_serial_sosp(tok):
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=30, target_max=30), 30, seed=13)
    rng = random.Random(3)
    demos = [flatten_sosp(p, solve_sosp(p, SolverConfig(), rng)[0]) for p in problems]
    runtime = Runtime(ReplayEngine.from_demos(demos, tok), tok, SerialProtocol(), RuntimeConfig(context_window=100_000))
    for problem, demo in zip(problems, demos):
        tree = run(runtime, problem)
        assert len(tree.threads) == 1 and tree.threads[0].end_reason is EndReason.EOS
        assert tree.correct == demo.solved


def test_replay_miss_is_recorded_as_an_error(tok):
    rng = random.Random(0)
    other = generate_problems(ProblemConfig(), 2, seed=14)
    engine = ReplayEngine.from_demos([flatten_apr(other[0], solve_apr(other[0], SolverConfig(), rng))], tok)
    tree = run(Runtime(engine, tok, APR), other[1])
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.ERROR and "ReplayMiss" in rec.detail and rec.output_ids == []
    assert not tree.correct and tree.final_answer is None and "error" in tree.check_reason


def test_replay_miss_of_one_child_reports_no_solution_to_the_parent(tok):
    rng = random.Random(5)
    problems = generate_problems(ProblemConfig(), 40, seed=15)
    demos = [flatten_apr(p, solve_apr(p, SolverConfig(apr_promising=1.0), rng)) for p in problems]
    demo = next(d for d in demos if d.spawns and d.solved)
    engine = ReplayEngine.from_demos([demo], tok)
    codec = TextCodec(tok)
    child = next(s for s in demo.sequences if s.depth == 1)
    del engine.completions[tuple([tok.bos_token_id, *codec.encode(child.prompt)])]
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(context_window=100_000)), demo.problem)
    errors = [r for r in tree.threads if r.end_reason is EndReason.ERROR]
    assert [codec.decode(r.prompt_ids) for r in errors if r.depth == 1] == [child.prompt]
    root = by_thread(tree)[(0, 1)]
    node = child.prompt.split("\n", 1)[0].removeprefix("Moving to Node #")
    joined = codec.decode(root.prompt_ids)
    assert f"at Node #{node}>" in joined and "<No Solution in Sub Search" in joined


# --- spawn / join by hand ------------------------------------------------------------------------


def test_reference_example_spawn_join_and_metrics(tok):
    engine = TextEngine(tok, reference_respond())
    tree = run(Runtime(engine, tok, APR), policy_version=3, problem_id="p")
    codec = TextCodec(tok)
    t = by_thread(tree)
    assert sorted(t) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert [r.request_id for r in tree.threads] == [0, 1, 2, 3]
    assert t[0, 0].end_reason is EndReason.SPAWN and t[0, 0].spawned_thread_ids == [1, 2]
    assert [t[k].end_reason for k in ((1, 0), (2, 0), (0, 1))] == [EndReason.EOS] * 3
    assert t[1, 0].parent_thread_id == t[2, 0].parent_thread_id == 0 and t[1, 0].depth == 1
    assert codec.decode(t[1, 0].prompt_ids) == CHILD_0_PROMPT and codec.decode(t[2, 0].prompt_ids) == CHILD_1_PROMPT
    # the continuation's prompt is the join text, encoded: the join block is never in output_ids
    assert t[0, 1].prompt_ids == [tok.bos_token_id, *codec.encode(JOINED)]
    assert engine.max_in_flight == 2  # the two children ran side by side
    assert tree.correct and tree.final_answer == ROOT_PATH and tree.check_reason == ""
    assert (tree.policy_version, tree.problem_id) == (3, "p")
    n = {k: len(r.output_ids) for k, r in t.items()}
    m = tree.metrics
    assert m.tokens_total == sum(n.values())
    assert m.tokens_critical_path == n[0, 0] + max(n[1, 0], n[2, 0]) + n[0, 1] == critical_path(tree.threads)[0]
    assert (m.num_threads, m.num_requests, m.num_spawns) == (3, 4, 1)
    assert m.max_context == max(len(r.prompt_ids) + len(r.output_ids) for r in tree.threads)
    assert all(0 <= r.start_s <= r.end_s <= m.wall_s for r in tree.threads)
    assert t[1, 0].start_s >= t[0, 0].end_s and t[0, 1].start_s >= max(t[1, 0].end_s, t[2, 0].end_s)


def test_max_children_runs_the_first_and_reports_the_rest_as_no_solution(tok):
    engine = TextEngine(tok, reference_respond())
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(max_children=1)))
    t = by_thread(tree)
    assert t[0, 0].spawned_thread_ids == [1] and "max_children" in t[0, 0].detail
    assert CHILD_1_PROMPT not in engine.prompts
    joined = TextCodec(tok).decode(t[0, 1].prompt_ids)
    assert ("<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
            "<No Solution in Sub Search 1 at level 1 at Node #0,1>\n") in joined
    assert not tree.correct


def test_spawn_at_max_depth_ends_the_thread(tok):
    tree = run(Runtime(TextEngine(tok, reference_respond()), tok, APR, RuntimeConfig(max_depth=0)))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.DEPTH and "max_depth=0" in rec.detail
    assert not tree.correct and "depth" in tree.check_reason


def test_nested_spawn_levels(tok):
    grand_spawn = (
        "Exploring Operation: 26*0=0, Resulting Numbers: [0]\n"
        "Generated Node #0,0,0: 27:[26, 0] Operation: 31-31=0\n"
        "Generated Node #0,0,1: 27:[26, 0] Operation: 31-31=0\n"
        "<Calling Sub Searches>\n"
        "<Start Sub Search 0 at level 2> Moving to Node #0,0,0\n"
        "<Start Sub Search 1 at level 2> Moving to Node #0,0,1\n"
        "<End Calling Sub Searches>\n"
    )
    respond = reference_respond({CHILD_0_PROMPT: grand_spawn})

    def nested(prompt, seed):
        if prompt.startswith("Moving to Node #0,0,"):
            return "No solution found.\n"
        return respond(prompt, seed)

    deep = run(Runtime(TextEngine(tok, nested), tok, APR, RuntimeConfig(max_depth=2)))
    assert max(r.depth for r in deep.threads) == 2 and deep.metrics.num_spawns == 2  # the root and child 0
    assert deep.correct
    shallow = run(Runtime(TextEngine(tok, nested), tok, APR, RuntimeConfig(max_depth=1)))
    assert by_thread(shallow)[1, 0].end_reason is EndReason.DEPTH and shallow.correct


# --- limits --------------------------------------------------------------------------------------


def test_max_tokens_ends_a_request(tok):
    tree = run(Runtime(TextEngine(tok, reference_respond()), tok, APR, RuntimeConfig(max_tokens=5)))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.MAX_TOKENS and len(rec.output_ids) == 5 == len(rec.logprobs)
    assert "max_tokens=5" in rec.detail and "max_tokens" in tree.check_reason


def test_context_window_before_and_during_a_request(tok):
    codec = TextCodec(tok)
    prompt_len = 1 + len(codec.encode(ROOT_PROMPT))
    engine = TextEngine(tok, reference_respond())
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(context_window=prompt_len)))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.CONTEXT and rec.output_ids == [] and engine.prompts == []
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(context_window=prompt_len + 7)))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.CONTEXT and len(rec.output_ids) == 7 and "context_window" in rec.detail


def test_tree_token_budget_is_strict(tok):
    codec = TextCodec(tok)
    parent = len(codec.encode(EXPAND + SPAWN)) + 1
    budget = parent + 10
    tree = run(Runtime(TextEngine(tok, reference_respond()), tok, APR, RuntimeConfig(max_tree_tokens=budget)))
    t = by_thread(tree)
    assert tree.metrics.tokens_total == budget
    assert t[0, 0].end_reason is EndReason.SPAWN
    assert {t[1, 0].end_reason, t[2, 0].end_reason} == {EndReason.TREE_TOKENS}
    assert t[0, 1].end_reason is EndReason.TREE_TOKENS and t[0, 1].output_ids == []
    assert all(len(r.logprobs) == len(r.output_ids) for r in tree.threads)


def test_timeout_cancels_outstanding_requests(tok):
    respond = reference_respond()

    def slow_children(prompt, seed):
        out = respond(prompt, seed)
        return ("sleep", 30.0, out) if prompt.startswith("Moving to Node #0,") else out

    engine = TextEngine(tok, slow_children)
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(timeout_s=0.3)))
    t = by_thread(tree)
    assert tree.metrics.wall_s < 20  # cut by the 0.3 s timeout, not run out to the children's 30 s sleep
    assert engine.cancelled == 2 and engine.in_flight == 0
    assert t[1, 0].end_reason is t[2, 0].end_reason is EndReason.TIMEOUT
    assert "timeout_s=0.3" in t[1, 0].detail and (0, 1) not in t
    assert not tree.correct and "timed out" in tree.check_reason


# --- malformed output and engine failures ----------------------------------------------------------


def test_model_written_join_block_is_malformed(tok):
    fake = EXPAND + "<Sub Searches>\n<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n" + CHILD_1_PATH
    respond = reference_respond({ROOT_PROMPT: fake + "<End Sub Searches>\n" + FINAL_OUT})
    tree = run(Runtime(TextEngine(tok, respond), tok, APR))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.MALFORMED and "runtime-owned" in rec.detail
    assert tree.final_answer is None and not tree.correct


@pytest.mark.parametrize(
    ("child_out", "why"),
    [
        (T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, 2, "0,1,7") + T.SPAWN_CLOSE + "\n", "never generated"),
        (T.SPAWN_OPEN + "\n<Start Sub Search 0 at level 2> Moving to Node #0,1\n", "did not end"),
        ("garbage\n" + T.SPAWN_CLOSE + "\n", "without"),
        (EXPAND.replace("#0,", "#0,1,") + SPAWN.replace("#0,", "#0,1,").replace("level 1", "level 2") * 2,
         "more than one"),
    ],
)
def test_malformed_child_spawn_ends_the_child_and_the_parent_sees_no_solution(tok, child_out, why):
    engine = TextEngine(tok, reference_respond({CHILD_1_PROMPT: child_out}))
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(max_depth=2)))
    t = by_thread(tree)
    assert t[2, 0].end_reason is EndReason.MALFORMED and why in t[2, 0].detail
    assert "<No Solution in Sub Search 1 at level 1 at Node #0,1>" in TextCodec(tok).decode(t[0, 1].prompt_ids)
    assert t[0, 1].end_reason is EndReason.EOS


@pytest.mark.parametrize(
    ("budget", "nodes", "why"),
    [
        (None, ["0", "0"], "node #0, the thread's own start node"),
        (4, ["0,1", "0"], "node #0, the thread's own start node"),
        (None, ["0,1", "0,1"], "node #0,1 twice"),
    ],
)
def test_spawn_at_the_root_own_node_or_twice_at_one_node_is_malformed(tok, budget, nodes, why):
    # children at the root's own node #0 would each solve the whole problem, and the join the runtime
    # writes would make their answers the root's for no search of its own
    prompt = APR.condition(budget) + ROOT_PROMPT
    spawn = T.SPAWN_OPEN + "\n" + "".join(T.spawn_child_line(i, 1, n) for i, n in enumerate(nodes)) + T.SPAWN_CLOSE
    engine = TextEngine(tok, reference_respond({prompt: EXPAND + spawn + "\n"}))
    tree = run(Runtime(engine, tok, APR, RuntimeConfig(budget=budget)))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.MALFORMED and why in rec.detail
    assert engine.prompts == [prompt]  # no child ran
    assert tree.final_answer is None and not tree.correct
    assert "malformed" in tree.check_reason and why in tree.check_reason


def test_engine_failures_are_errors(tok):
    def fail(prompt, seed):
        return RuntimeError("engine died") if prompt == CHILD_0_PROMPT else reference_respond()(prompt, seed)

    tree = run(Runtime(TextEngine(tok, fail), tok, APR))
    t = by_thread(tree)
    assert t[1, 0].end_reason is EndReason.ERROR and "engine died" in t[1, 0].detail
    assert tree.correct  # child 1 still found the goal

    class Inconsistent(TextEngine):
        async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
            result = await super().generate(prompt_ids, max_new_tokens, sampling)
            return GenerationResult(result.output_ids, result.logprobs[:-1], result.finish_reason)

    (rec,) = run(Runtime(Inconsistent(tok, reference_respond()), tok, APR)).threads
    assert rec.end_reason is EndReason.ERROR and "logprobs" in rec.detail


def test_truncated_root_with_a_goal_in_its_text_has_no_answer(tok):
    codec = TextCodec(tok)
    out = "27,27 equal: Goal Reached\n" + ROOT_PATH + "more"
    limit = len(codec.encode(out)) - 1
    respond = reference_respond({ROOT_PROMPT: out})
    tree = run(Runtime(TextEngine(tok, respond), tok, APR, RuntimeConfig(max_tokens=limit)))
    assert tree.threads[0].end_reason is EndReason.MAX_TOKENS and tree.final_answer is None and not tree.correct


def test_engine_eos_mismatch_is_refused(tok):
    engine = TextEngine(tok, reference_respond())
    engine.eos_token_id = 999
    with pytest.raises(ValueError, match="EOS"):
        Runtime(engine, tok, APR)


# --- seeds ---------------------------------------------------------------------------------------


def test_request_seeds_are_per_request_and_reproducible(tok):
    cfg = RuntimeConfig(sampling=SamplingConfig(seed=7))
    first, second = TextEngine(tok, reference_respond()), TextEngine(tok, reference_respond())
    run(Runtime(first, tok, APR, cfg), seed=1)
    run(Runtime(second, tok, APR, cfg), seed=1)
    assert sorted(zip(first.prompts, first.seeds)) == sorted(zip(second.prompts, second.seeds))
    assert len(set(first.seeds)) == 4 and None not in first.seeds
    assert request_seed(7, 1, 0, 0) in first.seeds and request_seed(7, 2, 0, 0) != request_seed(7, 1, 0, 0)
    unseeded = TextEngine(tok, reference_respond())
    run(Runtime(unseeded, tok, APR), seed=1)
    assert unseeded.seeds == [None] * 4


# --- decoding modes ------------------------------------------------------------------------------

SERIAL_PROMPT = "Current State: 27:[22, 26, 31, 53], Operations: []\n"
RIGHT = ("Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n27,27 equal: Goal Reached\n"
         "Current State: 27:[22, 26, 31, 53], Operations: []\n"
         "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
         "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
         "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n27,27 equal: Goal Reached\n")
WRONG = RIGHT.replace("26+1=27", "26+2=27")  # well-formed, bad arithmetic: votes, but fails the checker


def serial_engine(tok, outputs_by_seed):
    order: dict[int, int] = {}

    def respond(prompt, seed):
        assert prompt == SERIAL_PROMPT
        return outputs_by_seed[order.setdefault(seed, len(order))]

    return TextEngine(tok, respond)


def test_path_key_and_vote():
    assert path_key(T.answer_path(RIGHT)) == ("53-31=22", "22/22=1", "26+1=27")
    assert path_key(None) is None and path_key("Exploring Operation: 1+\n27,27 equal: Goal Reached\n") is None
    assert path_key("Exploring Operation: 1+1=2, Resulting Numbers: [2]\n") is None  # no goal line
    right, wrong = T.answer_path(RIGHT), T.answer_path(WRONG)
    assert vote([wrong, right, right, None]) == right
    assert vote([wrong, right]) == wrong  # tie: the earliest
    assert vote([None, "junk"]) is None


@pytest.mark.parametrize(
    ("mode", "outputs", "correct"),
    [
        ("cons", [WRONG, RIGHT, WRONG, "No solution found.\n"], False),
        ("cons", [WRONG, RIGHT, RIGHT, "No solution found.\n"], True),
        ("pass", [WRONG, "No solution found.\n", RIGHT, WRONG], True),
        ("pass", [WRONG, "No solution found.\n", WRONG, WRONG], False),
        ("sosp", [RIGHT], True),
    ],
)
def test_cons_and_pass_modes(tok, mode, outputs, correct):
    cfg = DecodeConfig(mode=mode, n=len(outputs), runtime=RuntimeConfig(sampling=SamplingConfig(seed=1)))
    engine = serial_engine(tok, outputs)
    (result,) = asyncio.run(decode(engine, tok, [PROBLEM], cfg))
    assert result.correct is correct and len(result.trees) == len(outputs) == len(engine.prompts)
    assert result.tokens_total == sum(t.metrics.tokens_total for t in result.trees)
    assert result.tokens_critical_path == max(t.metrics.tokens_critical_path for t in result.trees)
    if correct:
        assert result.answer == T.answer_path(RIGHT)


def test_apr_mode_and_config_checks(tok):
    (result,) = asyncio.run(decode(TextEngine(tok, reference_respond()), tok, [PROBLEM], DecodeConfig()))
    assert result.correct and result.trees[0].metrics.num_spawns == 1
    with pytest.raises(ValueError, match="n=3"):
        DecodeConfig(mode="apr", n=3)


# --- the generator's packed format and weight-update gate ------------------------------------------


def test_problems_to_batch_columns():
    batch = problems_to_batch([PROBLEM, Problem(10, (1, 2, 7))], seeds=[5, 6])
    assert batch["nums"].tolist() == [[22, 26, 31, 53], [1, 2, 7, -1]]
    assert batch["seed"].tolist() == [5, 6] and list(batch["problem_id"]) == [PROBLEM.problem_id, "10:1,2,7"]


class ReloadableTextEngine(TextEngine):
    def __init__(self, tok, respond):
        super().__init__(tok, respond)
        self.reloads: list[tuple[int, int]] = []  # (version, requests in flight at the reload)

    async def reload_weights(self, named_tensors, version):
        self.reloads.append((version, self.in_flight))
        return version


def test_weight_update_waits_for_trees_in_flight_and_versions_every_tree(tok):
    respond = reference_respond()
    engine = ReloadableTextEngine(tok, lambda p, s: ("sleep", 0.05, respond(p, s)))
    gen = GeneratorImpl(GeneratorConfig(engine={"model": "unused"}), engine=engine, tokenizer=tok)

    async def scenario():
        first = asyncio.create_task(gen.run_trees(problems_to_batch([PROBLEM] * 3)))
        await asyncio.sleep(0.02)  # the first batch is in flight
        update = asyncio.create_task(gen.load_weights([], version=1))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(gen.run_trees(problems_to_batch([PROBLEM] * 2)))
        done = await asyncio.gather(first, update, second)
        stale = await gen.load_weights([], version=1)
        return done, stale

    (first, version, second), stale = asyncio.run(scenario())
    assert version == 1 == gen.policy_version() == stale and engine.reloads == [(1, 0)]
    assert [t.policy_version for t in first] == [0, 0, 0]
    assert [t.policy_version for t in second] == [1, 1]
    assert all(t.correct for t in first + second)
    assert gen.stats()["trees_done"] == 5 and gen.stats()["last_drained"] == 3
