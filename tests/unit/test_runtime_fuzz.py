"""The runtime under adversarial model output: an engine whose completions hypothesis composes from real
and broken trace fragments (spawn blocks, well-formed or not, naming real or unknown nodes at right or
wrong levels, model-written join blocks, unbalanced markers, huge numbers, random text, truncation
anywhere, requests cut before EOS). Every tree must finish, in bounded time, with a recorded reason for
every request, consistent records (parents, segments, spawned children, logprob lengths) and every limit
respected. Then the extreme cases by hand: thousands of children, deep nesting, a spawn in every
request, and the memory they take."""

import asyncio
import re
import time
import tracemalloc

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import check_trace
from apr_ray.countdown.protocol import AprProtocol
from apr_ray.rollout.engines import Engine, GenerationResult, TextCodec
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import EndReason, critical_path

TOK = build_tokenizer()
CODEC = TextCodec(TOK)
NODE_RE = re.compile(r"Moving to Node #([0-9,]{1,200})")
CFG = RuntimeConfig(max_children=4, max_depth=3, max_tokens=6_000, context_window=12_000,
                    max_tree_tokens=60_000, timeout_s=20.0)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FuzzEngine(Engine):
    """Request i gets plans[i] rendered at the prompt's node; past the plans, "No solution found."."""

    def __init__(self, plans):
        self.plans = plans
        self.eos_token_id = TOK.eos_token_id
        self.requests = 0

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        prompt = CODEC.decode(prompt_ids)
        m = NODE_RE.search(prompt)
        node = m[1] if m else "0"
        if self.requests < len(self.plans):
            fragments, cut, eos = self.plans[self.requests]
        else:
            fragments, cut, eos = [const("No solution found.\n")], None, True
        self.requests += 1
        text = "".join(fragment(node, node.count(",")) for fragment in fragments)
        if cut is not None:
            text = text[: cut % (len(text) + 1)]
        await asyncio.sleep(0)
        ids = CODEC.encode(text) + ([self.eos_token_id] if eos else [])
        finish = "eos" if eos else "length"
        if len(ids) > max_new_tokens:
            ids, finish = ids[:max_new_tokens], "length"
        return GenerationResult(ids, [-1.0] * len(ids), finish)


# --- fragments: functions of the thread's node id and depth ---------------------------------------

huge = st.one_of(st.integers(0, 200), st.integers(10**11, 10**40), st.integers(1, 3000).map(lambda n: int("9" * n)))
small = st.integers(0, 5)


def expand(k, value, nums):
    return lambda node, depth: "".join(
        f"Exploring Operation: 1+1=2, Resulting Numbers: {T.fmt_nums(nums)}\n"
        f"Generated Node #{node},{i}: {value}:{T.fmt_nums(nums)} Operation: 1+1=2\n" for i in range(k))


def spawn(children, close, level_shift):
    """children: (index shift, which node: declared index or an unknown id)."""
    def render(node, depth):
        lines = [T.SPAWN_OPEN + "\n"]
        for i, (shift, which) in enumerate(children):
            child = f"{node},{which}" if isinstance(which, int) else which
            lines.append(T.spawn_child_line(i + shift, depth + 1 + level_shift, child))
        if close:
            lines.append(T.SPAWN_CLOSE + "\n")
        return "".join(lines)
    return render


def many_children(n):
    """n declared nodes and a spawn block naming all of them (up to thousands)."""
    declare, call = expand(n, 27, [1, 2]), spawn([(0, i) for i in range(n)], True, 0)
    return lambda node, depth: declare(node, depth) + call(node, depth)


def const(text):
    return lambda node, depth: text


fragments = st.one_of(
    st.builds(expand, st.integers(1, 4), huge, st.lists(huge, max_size=4)),
    st.builds(spawn, st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, -1]),
                                        st.one_of(small, st.sampled_from(["7,7", "0", "0,0,0,0,0,0,0,0,0"]))),
                              min_size=1, max_size=6),
              st.booleans(), st.sampled_from([0, 0, 0, 1, -1])),
    st.builds(many_children, st.integers(5, 1500)),
    st.sampled_from([
        T.SPAWN_OPEN + "\n", T.SPAWN_CLOSE + "\n", T.JOIN_OPEN + "\n", T.JOIN_CLOSE + "\n", "No solution found.\n",
        "27,27 equal: Goal Reached\n", "<Goal Reached in Sub Search 0 at level 1 at Node #0,0>\n",
        T.SPAWN_OPEN + "\n" + T.SPAWN_OPEN + "\n", "\n\n\n", "Sub Call Budget: 3 ",
    ]).map(const),
    st.text(max_size=40).map(const),
    st.text(alphabet="<>[]#,:0123456789 \nSub Searches", max_size=60).map(const),
    huge.map(lambda n: const(f"Generated Node #0,0: {n}:[{n}] Operation: {n}+{n}={n}\n")),
)



@st.composite
def well_formed_spawn(draw):
    """Declare k nodes and spawn j of them, as a trained model would (so trees grow and nest)."""
    k = draw(st.integers(1, 6))
    j = draw(st.integers(1, k))
    return [expand(k, 27, [1, 2]), spawn([(0, i) for i in range(j)], True, 0)]


garbage = st.lists(fragments, min_size=1, max_size=6)
plans = st.one_of(
    st.tuples(well_formed_spawn(), st.none(), st.just(True)),
    st.tuples(st.tuples(garbage, well_formed_spawn()).map(lambda t: t[0] + t[1]), st.none(), st.just(True)),
    st.tuples(
        garbage,
        st.one_of(st.none(), st.integers(0, 10**6)),  # truncate the text somewhere
        st.booleans(),  # EOS or cut off (finish "length")
    ),
)


def check_tree(tree, cfg, wall_s):
    """Every invariant of a finished tree."""
    # (its wall time is a benchmark figure, bench/unit_timings.py: a busy machine must not fail the test)
    assert all(r.end_reason is not EndReason.TIMEOUT for r in tree.threads), f"tree timed out after {wall_s:.1f}s"
    threads = {r.thread_id: [] for r in tree.threads}
    for r in tree.threads:
        threads[r.thread_id].append(r)
    assert [r.request_id for r in tree.threads] == list(range(len(tree.threads)))
    for tid, segs in threads.items():
        assert [s.segment for s in segs] == list(range(len(segs)))
        assert all(s.end_reason is EndReason.SPAWN for s in segs[:-1])  # only a spawn is resumed
        assert len({(s.parent_thread_id, s.depth) for s in segs}) == 1
    for r in tree.threads:
        assert isinstance(r.end_reason, EndReason) and r.end_reason is not EndReason.ERROR
        assert r.end_reason is not EndReason.TIMEOUT
        assert "internal error" not in r.detail, r.detail  # a parser raised something else than ProtocolError
        if r.end_reason is EndReason.EOS:
            assert r.detail == ""
        elif r.end_reason is not EndReason.SPAWN:
            assert r.detail  # every other ending says why
        assert len(r.logprobs) == len(r.output_ids) <= cfg.max_tokens
        assert len(r.prompt_ids) + len(r.output_ids) <= cfg.context_window
        assert r.depth <= cfg.max_depth
        if r.end_reason is EndReason.SPAWN:
            assert 1 <= len(r.spawned_thread_ids) <= cfg.max_children and r.depth < cfg.max_depth
            for child in r.spawned_thread_ids:
                first = threads[child][0]
                assert first.parent_thread_id == r.thread_id and first.depth == r.depth + 1
        if r.thread_id != 0:
            assert r.parent_thread_id in threads
    m = tree.metrics
    assert m.tokens_total == sum(len(r.output_ids) for r in tree.threads) <= cfg.max_tree_tokens
    assert critical_path(tree.threads)[0] == m.tokens_critical_path <= m.tokens_total
    assert m.num_threads == len(threads)
    if tree.correct:
        assert check_trace(tree.target, tree.nums, tree.final_answer).ok
    else:
        assert tree.check_reason


def run_tree(engine, cfg=CFG):
    runtime = Runtime(engine, TOK, AprProtocol(), cfg)
    start = time.perf_counter()
    tree = asyncio.run(runtime.run_tree(27, [22, 26, 31, 53]))
    return tree, time.perf_counter() - start


@FUZZ
@given(st.lists(plans, min_size=1, max_size=25))
def test_runtime_survives_adversarial_output(script):
    engine = FuzzEngine(script)
    tree, wall = run_tree(engine)
    check_tree(tree, CFG, wall)
    assert engine.requests <= len(tree.threads)
    for reason in sorted({r.end_reason.value for r in tree.threads}):
        event(f"a request ended with {reason}")
    event(f"deepest thread: {max(r.depth for r in tree.threads)}")


# --- extremes by hand ------------------------------------------------------------------------------


def test_thousands_of_children_run_up_to_the_cap_and_are_all_joined():
    tracemalloc.start()
    engine = FuzzEngine([([many_children(1000)], None, True)])
    cfg = RuntimeConfig(max_children=8, context_window=100_000, max_tokens=100_000)
    tree, wall = run_tree(engine, cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    check_tree(tree, cfg, wall)
    root = [r for r in tree.threads if r.thread_id == 0]
    assert root[0].end_reason is EndReason.SPAWN and len(root[0].spawned_thread_ids) == 8
    assert "1000 children" in root[0].detail
    joined = CODEC.decode(root[1].prompt_ids)
    assert joined.count("<No Solution in Sub Search") == 1000 and "Sub Search 999 at level 1" in joined
    assert peak < 200 * 1024**2, f"peak traced memory {peak / 1024**2:.0f} MiB"


def test_more_children_than_a_spawn_block_may_hold_is_malformed():
    engine = FuzzEngine([([many_children(1100)], None, True)])
    tree, wall = run_tree(engine, RuntimeConfig(context_window=100_000, max_tokens=100_000))
    (rec,) = tree.threads
    assert rec.end_reason is EndReason.MALFORMED and "1024 lines" in rec.detail


def test_every_thread_spawning_stops_at_max_depth():
    always = ([expand(2, 27, [1, 2]), spawn([(0, 0), (0, 1)], True, 0)], None, True)
    engine = FuzzEngine([always] * 10_000)
    cfg = RuntimeConfig(max_depth=6, max_children=2, max_tree_tokens=20_000)
    tree, wall = run_tree(engine, cfg)
    check_tree(tree, cfg, wall)
    deepest = [r for r in tree.threads if r.depth == 6]
    assert sum(r.end_reason is EndReason.DEPTH for r in deepest) >= 2**6
    assert {r.end_reason for r in deepest} <= {EndReason.DEPTH, EndReason.TREE_TOKENS}
    # every spawning thread resumes after its join, and keeps spawning until the tree budget ends it
    assert tree.metrics.num_spawns >= 2**6 - 1


def test_a_thread_that_spawns_forever_is_stopped_by_the_tree_budget():
    always = ([expand(1, 27, [1, 2]), spawn([(0, 0)], True, 0)], None, True)
    engine = FuzzEngine([always] * 100_000)
    cfg = RuntimeConfig(max_depth=1, max_tree_tokens=5_000, context_window=100_000)
    tree, wall = run_tree(engine, cfg)
    check_tree(tree, cfg, wall)
    assert tree.metrics.tokens_total == 5_000
    assert tree.threads[-1].end_reason in (EndReason.TREE_TOKENS, EndReason.DEPTH)
    assert any(r.end_reason is EndReason.TREE_TOKENS for r in tree.threads)
