"""Fuzzing the protocol's parsers and join builder with malformed model output: soups of real and broken
trace lines, markers out of place, random unicode, huge numbers, deep node ids, truncation, thousands of
children. `find_spawn` returns None / a consistent Spawn or raises ProtocolError (nothing else), `join`
never crashes and never plants a block in the parent's prompt, the scanners and the checker never crash,
and all of it in bounded time."""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import CheckResult, check_trace
from apr_ray.countdown.protocol import AprProtocol, ProtocolError, Spawn, node_states

APR = AprProtocol()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARENT = (
    "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
    "Moving to Node #0,1\nCurrent State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
)
MARKERS = [T.SPAWN_OPEN, T.SPAWN_CLOSE, T.JOIN_OPEN, T.JOIN_CLOSE]

# the line templates only format their arguments: digit strings stand in for numbers too large for str(int)
numbers = st.one_of(st.integers(0, 120), st.integers(0, 10**15), st.integers(1, 5000).map(lambda n: "7" * n))
small = st.integers(0, 6)
node_ids = st.one_of(
    st.sampled_from(["0", "0,0", "0,1", "0,1,0", "0,2", "1,0"]),
    st.lists(st.integers(0, 99), min_size=1, max_size=50).map(lambda xs: ",".join(map(str, [0, *xs]))),
)
ops = st.tuples(numbers, st.sampled_from("+-*/"), numbers, numbers).map(lambda o: f"{o[0]}{o[1]}{o[2]}={o[3]}")
num_lists = st.lists(numbers, max_size=5)
lines = st.one_of(
    st.builds(T.state_line, numbers, num_lists, st.lists(ops, max_size=3)),
    st.builds(T.moving_line, node_ids),
    st.builds(T.exploring_line, ops, num_lists),
    st.builds(T.generated_line, node_ids, numbers, num_lists, ops),
    st.builds(T.goal_line, numbers),
    st.builds(T.unequal_line, numbers, numbers),
    st.builds(T.spawn_child_line, st.one_of(small, numbers), st.one_of(small, numbers), node_ids),
    st.builds(T.join_goal_line, small, small, node_ids),
    st.builds(T.join_no_solution_line, small, small, node_ids),
    st.sampled_from([m + "\n" for m in MARKERS] + MARKERS + [T.NO_SOLUTION + "\n", "\n", "Sub Call Budget: 3 "]),
    st.text(max_size=30),  # random unicode, including \r, \x00 and line separators
    st.text(alphabet="<>[]#,:0123456789 \n", max_size=30),
)
soups = st.lists(lines, max_size=40).map("".join)
GOAL = "27,27 equal: Goal Reached\n"
# text between two goal lines is what a thread reports as its answer: make sure fuzzed texts have some
answers = st.tuples(soups, soups, st.sampled_from(["", "\n", "tail"])).map(lambda t: t[0] + GOAL + t[1] + GOAL + t[2])


@st.composite
def contexts(draw, depth: int = 0) -> str:
    """A thread's text at `depth`: often a real parent with a (maybe broken) spawn block, sometimes pure
    soup; sometimes truncated anywhere."""
    head = draw(st.sampled_from(["", PARENT, "Sub Call Budget: 5 " + PARENT]))
    body = draw(st.one_of(st.just(""), soups, answers))
    if draw(st.sampled_from(["block", "block", "block", "no block"])) == "block":
        if draw(st.booleans()):  # well-formed: right indices and level, distinct nodes the parent generated
            nodes = draw(st.lists(st.sampled_from(["0,0", "0,1", "0,1,0"]), min_size=1, max_size=3, unique=True))
            children = [(i, depth + 1, node) for i, node in enumerate(nodes)]
        else:
            children = draw(st.lists(st.tuples(st.one_of(small, numbers), st.one_of(small, numbers), node_ids),
                                     max_size=6))
        body += T.SPAWN_OPEN + "\n" + "".join(T.spawn_child_line(*c) for c in children) + T.SPAWN_CLOSE
        body += draw(st.sampled_from(["", "\n", " \n\n"]))
    text = head + body
    if draw(st.sampled_from(["whole", "whole", "whole", "truncated"])) == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text


child_texts = st.one_of(st.none(), soups, answers, st.text(max_size=200), st.just(PARENT + GOAL * 2))


def assert_join_is_clean(spawn: Spawn, depth: int, texts: list) -> str:
    joined = APR.join(spawn, depth, texts)
    assert joined.startswith(spawn.prefix)
    block = joined[len(spawn.prefix):]
    assert block.startswith(T.JOIN_OPEN + "\n") and block.endswith(T.JOIN_CLOSE + "\n")
    assert block.count(T.JOIN_OPEN) == block.count(T.JOIN_CLOSE) == 1
    assert T.SPAWN_OPEN not in block and T.SPAWN_CLOSE not in block
    if T.SPAWN_OPEN not in spawn.prefix:  # the parent's next request must not be malformed because of it
        assert APR.find_spawn(joined + "No solution found.\n", depth, 8) is None
    return joined


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(0, 3), st.integers(1, 20), st.data())
def test_find_spawn_and_join_on_malformed_output(depth, max_children, data):
    context = data.draw(contexts(depth))
    try:
        spawn = APR.find_spawn(context, depth, max_children)
    except ProtocolError as err:
        event("ProtocolError")
        assert str(err)
        return
    if spawn is None:
        event("no spawn")
        assert not context.rstrip().endswith(T.SPAWN_CLOSE)
        return
    event("spawn")
    assert isinstance(spawn, Spawn)
    assert context.startswith(spawn.prefix)
    assert context[len(spawn.prefix):].startswith(T.SPAWN_OPEN + "\n")
    assert 1 <= len(spawn.children) <= min(max_children, spawn.requested)
    for i, child in enumerate(spawn.children):
        assert child.index == i
        assert child.prompt.startswith(T.moving_line(child.node_id)) and child.prompt.count("\n") == 2
        assert child.node_id in node_states(child.prompt)
    texts = data.draw(st.lists(child_texts, min_size=len(spawn.children), max_size=len(spawn.children)))
    assert_join_is_clean(spawn, depth, texts)


@pytest.mark.timeout(60)
@FUZZ
@given(st.lists(child_texts, min_size=2, max_size=2), st.integers(0, 3))
def test_join_never_crashes_on_child_texts(texts, depth):
    context = PARENT + T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, depth + 1, "0,0") + \
        T.spawn_child_line(1, depth + 1, "0,1,0") + T.SPAWN_CLOSE + "\n"
    spawn = APR.find_spawn(context, depth, 8)
    assert [c.node_id for c in spawn.children] == ["0,0", "0,1,0"]
    joined = assert_join_is_clean(spawn, depth, texts)
    for child, text in zip(spawn.children, texts):
        answer = APR.final_answer(text) if text is not None else None
        clean = answer is not None and not any(m in answer for m in MARKERS)
        event("child answer: " + ("clean" if clean else "none" if answer is None else "with a block marker"))
        line = (T.join_goal_line if clean else T.join_no_solution_line)(child.index, depth + 1, child.node_id)
        assert line in joined


@pytest.mark.timeout(60)
@FUZZ
@given(st.one_of(soups, answers, st.text(max_size=300), contexts()))
def test_scanners_and_checker_never_crash(text):
    answer = T.answer_path(text)
    event("answer" if answer is not None else "no answer")
    if answer is not None:
        assert answer in text and T.GOAL_LINE_SUFFIX in answer.rstrip("\n").rsplit("\n", 1)[-1]
        assert APR.final_answer(text) == answer
    for node_id, (target, nums, ops_) in node_states(text).items():
        assert isinstance(target, int) and all(isinstance(n, int) for n in nums)
        assert all(isinstance(o, str) for o in ops_)
        assert node_id
    result = check_trace(27, [22, 26, 31, 53], text)
    assert isinstance(result, CheckResult) and result.reason
    assert result.ok == (result.reason == "ok")


# --- pathological inputs, fixed ---------------------------------------------------------------------


def generated(n: int) -> str:
    return "".join(T.generated_line(f"0,{k}", 27, [1, 2], "1+1=2") for k in range(n))


@pytest.mark.timeout(10)
def test_thousands_of_children_are_capped():
    prefix = PARENT + generated(1000)
    block = "".join(T.spawn_child_line(k, 1, f"0,{k}") for k in range(1000))
    spawn = APR.find_spawn(prefix + T.SPAWN_OPEN + "\n" + block + T.SPAWN_CLOSE, 0, max_children=8)
    assert spawn.requested == 1000 and [c.node_id for c in spawn.children] == [f"0,{k}" for k in range(8)]
    assert_join_is_clean(spawn, 0, [None] * 8)
    block = "".join(T.spawn_child_line(k, 1, f"0,{k}") for k in range(3000))
    with pytest.raises(ProtocolError, match="longer than"):
        APR.find_spawn(prefix + T.SPAWN_OPEN + "\n" + block + T.SPAWN_CLOSE, 0, max_children=8)


HUGE = "9" * 5000


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("deeply nested blocks", (T.SPAWN_OPEN + "\n") * 5000 + (T.SPAWN_CLOSE + "\n") * 5000),
        ("nested spawn inside a spawn", PARENT + T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, 1, "0,0") + T.SPAWN_OPEN
         + "\n" + T.spawn_child_line(0, 2, "0,0") + T.SPAWN_CLOSE + "\n" + T.SPAWN_CLOSE),
        ("node id 60 levels deep", PARENT + T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, 1, ",".join(["0"] * 60))
         + T.SPAWN_CLOSE),
        ("5000-digit index", PARENT + T.SPAWN_OPEN + f"\n<Start Sub Search {HUGE} at level 1> Moving to Node #0,0\n"
         + T.SPAWN_CLOSE),
        ("5000-digit level", PARENT + T.SPAWN_OPEN + f"\n<Start Sub Search 0 at level {HUGE}> Moving to Node #0,0\n"
         + T.SPAWN_CLOSE),
        ("5000-digit node", PARENT + T.SPAWN_OPEN + f"\n<Start Sub Search 0 at level 1> Moving to Node #{HUGE}\n"
         + T.SPAWN_CLOSE),
        ("node with a 5000-digit state", f"Moving to Node #0\nCurrent State: {HUGE}:[{HUGE}], Operations: []\n"
         + T.SPAWN_OPEN + "\n" + T.spawn_child_line(0, 1, "0") + T.SPAWN_CLOSE),
        ("100k-character line in the block", PARENT + T.SPAWN_OPEN + "\n" + "x" * 100_000 + "\n" + T.SPAWN_CLOSE),
        ("10 MB before the block", "y" * 10_000_000 + "\n" + PARENT + T.SPAWN_OPEN + "\n" + "z\n" + T.SPAWN_CLOSE),
        ("100k opens, one close", (T.SPAWN_OPEN + "\n") * 100_000 + T.SPAWN_CLOSE),
        ("100k opens, no close", (T.SPAWN_OPEN + "\n") * 100_000),
        ("close only", T.SPAWN_CLOSE),
    ],
)
def test_pathological_spawn_requests_raise_protocol_error(name, context):
    with pytest.raises(ProtocolError):
        APR.find_spawn(context, 0, 8)


@pytest.mark.timeout(10)
def test_huge_inputs_without_a_spawn():
    text = (PARENT + "27,27 equal: Goal Reached\n" + HUGE + "\n") * 2000  # ~10 MB
    assert APR.find_spawn(text, 0, 8) is None
    assert APR.final_answer(text) is not None
    assert not check_trace(27, [22, 26, 31, 53], text).ok
    assert set(node_states(text)) == {"0", "0,0", "0,1", "0,1,0"}
    assert node_states("Moving to Node #" + "0," * 200_000 + "0\nCurrent State: 27:[1], Operations: []\n") == {}
    assert node_states("\u2028".join([PARENT] * 3)) == node_states(PARENT)  # other line breaks are not lines
