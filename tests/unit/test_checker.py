"""The strict checker's catalogue: a valid path passes; every kind of wrong answer is rejected with a
reason that names what is wrong; hostile input (huge, garbage, 5000-digit numbers) gets a reason, not
a crash or a hang."""

import pytest

from apr_ray.countdown.checker import CheckResult, apply_operation, check_path, check_trace

TARGET, NUMS = 27, [22, 26, 31, 53]

# The reference's example solution path (shared/research/apr.md §1), written out literally.
VALID_PATH = (
    "Moving to Node #0\n"
    "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
    "Moving to Node #0,1\n"
    "Current State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
)
SEARCH = (
    "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,0: 27:[22, 26, 22] Operation: 53-31=22\n"
    "Moving to Node #0,0\n"
    "Current State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,0,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,0,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
)


def trace(path: str) -> str:
    """A whole serial trace: the search up to its goal line, then the summary path."""
    return SEARCH + path


def ops_path(target: int, *ops: str, goal: int | None = None) -> str:
    """A path of bare operation lines `"a+b=c|[rest]"` and a goal line."""
    lines = []
    for op in ops:
        operation, rest = op.split("|")
        lines.append(f"Exploring Operation: {operation}, Resulting Numbers: {rest}\n")
    goal = target if goal is None else goal
    return "".join(lines) + f"{goal},{goal} equal: Goal Reached\n"


def named(*cases):
    """Parametrize rows with their first field as the test id (pytest would str() a 5000-digit int)."""
    return [pytest.param(*case, id=case[0]) for case in cases]


def test_valid_path_passes():
    result = check_path(TARGET, NUMS, VALID_PATH)
    assert result.ok and bool(result) and result.reason == "ok"
    assert result.operations == ["53-31=22", "22/22=1", "26+1=27"]
    assert check_trace(TARGET, NUMS, trace(VALID_PATH)).ok
    assert check_trace(TARGET, tuple(reversed(NUMS)), trace(VALID_PATH)).ok  # the numbers' order is free


def test_twelve_digit_numbers_are_checked_exactly():
    big = 123_456_789_012
    path = ops_path(2 * big + 5, f"{big}*2={2 * big}|[5, {2 * big}]", f"{2 * big}+5={2 * big + 5}|[{2 * big + 5}]")
    assert check_path(2 * big + 5, [big, 2, 5], path).ok


@pytest.mark.parametrize(
    ("name", "target", "nums", "path", "words"),
    named(
        ("reused number", 27, NUMS, ops_path(27, "53+53=106|[22, 26, 31, 106]"), ["53", "not available"]),
        ("number not in the problem", 27, NUMS, ops_path(27, "99-72=27|[22, 26, 31, 53, 27]"),
         ["99", "not available"]),
        ("reused intermediate", 27, [2, 3, 4], ops_path(27, "2+3=5|[4, 5]", "5+5=10|[4, 10]"), ["5", "not available"]),
        ("wrong arithmetic", 27, NUMS, ops_path(27, "53-31=21|[22, 26, 21]"), ["wrong arithmetic", "53-31 is 22"]),
        ("non-exact division", 3, [7, 2, 0], ops_path(3, "7/2=3|[0, 3]", "3+0=3|[3]"), ["non-exact division"]),
        ("division by zero", 5, [5, 0, 1], ops_path(5, "5/0=0|[1, 0]"), ["division by zero"]),
        ("negative subtraction", 27, NUMS, ops_path(27, "31-53=22|[22, 26, 22]"), ["negative"]),
        ("unused numbers", 27, NUMS, ops_path(27, "53-26=27|[22, 31, 27]"), ["unused", "22", "31"]),
        ("wrong target in goal line", 27, NUMS, VALID_PATH.replace("27,27 equal", "28,28 equal"),
         ["goal line", "target 27"]),
        ("wrong target in state line", 27, NUMS,
         VALID_PATH.replace("Current State: 27:[26, 1]", "Current State: 28:[26, 1]"),
         ["state line", "28"]),
        ("final value is not the target", 30, [2, 3, 4], ops_path(30, "2+3=5|[4, 5]", "4*5=20|[20]"),
         ["final value", "20", "target 30"]),
        ("wrong stated resulting numbers", 27, NUMS, VALID_PATH.replace("[26, 1]\n", "[26, 2]\n", 1),
         ["stated resulting numbers", "[2, 26]", "[1, 26]"]),
        ("dropped resulting number", 27, NUMS,
         VALID_PATH.replace("Resulting Numbers: [22, 26, 22]", "Resulting Numbers: [22, 26]"),
         ["stated resulting numbers"]),
        ("truncated path", 27, NUMS, VALID_PATH[: VALID_PATH.rindex("27,27")], ["truncated"]),
        ("malformed operation", 27, NUMS, VALID_PATH.replace("53-31=22,", "53 - 31 = 22,"), ["malformed operation"]),
        ("negative number", 27, NUMS, VALID_PATH.replace("53-31=22,", "31-53=-22,"), ["malformed operation"]),
        ("operator not allowed", 27, NUMS, VALID_PATH.replace("53-31=22,", "53^31=22,"), ["malformed operation"]),
        ("no operations", 27, NUMS, "27,27 equal: Goal Reached\n", ["unused"]),
        ("garbage text", 27, NUMS, "the answer is 27\nbelieve me\n", ["truncated"]),
        ("empty string", 27, NUMS, "", ["truncated"]),
        ("problem target too large", 10**5000, NUMS, VALID_PATH, ["target", "outside"]),
        ("problem number too large", 27, [10**5000, 3], VALID_PATH, ["number", "outside"]),
    ),
)
def test_wrong_paths_are_rejected_with_a_reason(name, target, nums, path, words):
    result = check_path(target, nums, path)
    assert not result.ok and not result
    for word in words:
        assert word in result.reason, f"{name}: {result.reason!r} lacks {word!r}"


@pytest.mark.parametrize(
    ("name", "text", "words"),
    named(
        ("empty string", "", ["no goal"]),
        ("garbage", "lorem ipsum\n\x00\x01 \u2603 ]]]['\n", ["no goal"]),
        ("search without summary path", SEARCH, ["no goal"]),  # original SoS: one goal line, no summary
        ("truncated summary path", trace(VALID_PATH[: VALID_PATH.rindex("27,27")]), ["no goal"]),
        ("goal lines with nothing between", "27,27 equal: Goal Reached\n27,27 equal: Goal Reached\n", ["unused"]),
        # a child's path starts from its own node: replayed from the problem's numbers it reuses a 22
        ("a child's path as the answer", trace(VALID_PATH[VALID_PATH.index("Moving to Node #0,1\n"):]),
         ["22", "not available"]),
    ),
)
def test_wrong_traces_are_rejected_with_a_reason(name, text, words):
    result = check_trace(TARGET, NUMS, text)
    assert isinstance(result, CheckResult) and not result.ok
    for word in words:
        assert word in result.reason, f"{name}: {result.reason!r} lacks {word!r}"


def test_non_string_trace_is_rejected():
    result = check_trace(TARGET, NUMS, None)  # type: ignore[arg-type]
    assert not result.ok and "NoneType" in result.reason


def test_text_after_the_last_goal_line_is_ignored():
    assert check_trace(TARGET, NUMS, trace(VALID_PATH) + "Moving to Node #9\nblah").ok


# --- join blocks: a spawn the protocol refuses is refused here too ---------------------------------

from test_runtime import EXPAND, ROOT_PROMPT  # noqa: E402 (the reference example's root, shared)

CHILD_1_PATH = VALID_PATH[VALID_PATH.index("Moving to Node #0,1\n"):]


def joined(*results: tuple[str, str, str]) -> str:
    """A runtime-written join block: (kind, node id, child answer path) per child, in spawn order."""
    lines = ["<Sub Searches>\n"]
    for i, (kind, node_id, path) in enumerate(results):
        lines.append(f"<{kind} in Sub Search {i} at level 1 at Node #{node_id}>\n" + path)
    return "".join(lines) + "<End Sub Searches>\n"


# the reference example: child 1 (at #0,1) finds the goal, the root commits to it with its own path
LEGIT = ROOT_PROMPT + EXPAND + joined(("No Solution", "0,0", ""), ("Goal Reached", "0,1", CHILD_1_PATH)) + (
    "27,27 equal: Goal Reached\n" + VALID_PATH
)
# two children at the root's own node #0 whose answers, side by side, form a valid summary path: without
# the join check this passes with no search of the root's own
GAMED = ROOT_PROMPT + joined(("Goal Reached", "0", VALID_PATH), ("Goal Reached", "0", VALID_PATH))


def test_a_legitimate_join_passes():
    assert check_trace(TARGET, NUMS, LEGIT).ok
    assert check_trace(TARGET, NUMS, "Sub Call Budget: 4 " + LEGIT).ok
    # a later spawn may name a node of an earlier one: each join block is checked on its own
    again = ROOT_PROMPT + EXPAND + joined(("No Solution", "0,1", "")) + joined(("Goal Reached", "0,1", CHILD_1_PATH))
    assert check_trace(TARGET, NUMS, again + "27,27 equal: Goal Reached\n" + VALID_PATH).ok


@pytest.mark.parametrize(
    ("name", "text", "words"),
    named(
        ("children at the root's own node", GAMED, "node #0, the trace's own start node"),
        ("budget-prefixed root", "Sub Call Budget: 4 " + GAMED, "node #0, the trace's own start node"),
        ("one child at the root's own node", ROOT_PROMPT + EXPAND + joined(("No Solution", "0", ""))
         + "27,27 equal: Goal Reached\n" + VALID_PATH, "node #0, the trace's own start node"),
        ("a child thread at its own node", CHILD_1_PATH[:CHILD_1_PATH.index("Exploring")]
         + joined(("Goal Reached", "0,1", CHILD_1_PATH)) + "27,27 equal: Goal Reached\n" + CHILD_1_PATH,
         "node #0,1, the trace's own start node"),
        ("the same node twice", LEGIT.replace("<End Sub Searches>", "<No Solution in Sub Search 2 at level 1 at "
                                              "Node #0,1>\n<End Sub Searches>"), "node #0,1 twice"),
        ("unclosed join block", ROOT_PROMPT + joined(("Goal Reached", "0", VALID_PATH))[: -len("<End Sub Searches>\n")]
         + "27,27 equal: Goal Reached\n", "node #0, the trace's own start node"),
    ),
)
def test_joins_of_refused_spawns_are_malformed(name, text, words):
    result = check_trace(TARGET, NUMS, text)
    assert not result.ok and result.reason.startswith("malformed spawn"), f"{name}: {result.reason!r}"
    assert words in result.reason, f"{name}: {result.reason!r} lacks {words!r}"


# --- hostile input: bounded work, a reason, no crash ---------------------------------------------

HUGE = "9" * 5000


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "text", "words"),
    named(
        ("100k characters, no goal", ("Exploring Operation: 1+2=3, Resulting Numbers: [3]\n" * 2000)[:100_000],
         ["no goal"]),
        ("100k-character line between goal lines",
         trace("Exploring Operation: " + "1" * 100_000 + "\n27,27 equal: Goal Reached\n"),
         ["malformed operation"]),
        ("100k-character 'Current State' line", trace("Current State: " * 7000 + "\n27,27 equal: Goal Reached\n"),
         ["unused"]),
        ("100k lines between goal lines", trace("x\n" * 100_000 + "27,27 equal: Goal Reached\n"), ["longer than"]),
        ("100k goal lines", "27,27 equal: Goal Reached\n" * 4000, ["unused"]),
        ("input over the size cap", "27,27 equal: Goal Reached\n" * 80_000, ["too long"]),
        ("5000-digit operand", trace(f"Exploring Operation: {HUGE}+1={HUGE}, Resulting Numbers: [{HUGE}]\n"
                                     f"{HUGE},{HUGE} equal: Goal Reached\n"), ["malformed operation"]),
        ("5000-digit goal line", trace(VALID_PATH.replace("27,27 equal", f"{HUGE},27 equal")), ["truncated"]),
        ("20k join blocks", ROOT_PROMPT + joined(("No Solution", "0,1", "")) * 20_000, ["no goal"]),
        ("100k unclosed join openings", ROOT_PROMPT + "<Sub Searches>\n" * 100_000, ["no goal"]),
    ),
)
def test_hostile_traces_get_a_reason(name, text, words):
    result = check_trace(TARGET, NUMS, text)
    assert not result.ok
    for word in words:
        assert word in result.reason, f"{name}: {result.reason!r} lacks {word!r}"


@pytest.mark.timeout(10)
def test_5000_digit_numbers_in_an_otherwise_valid_path_do_not_crash():
    path = VALID_PATH.replace("Resulting Numbers: [26, 1]", f"Resulting Numbers: [26, 1, {HUGE}]")
    assert not check_path(TARGET, NUMS, path).ok
    assert not check_path(10**5000, [10**5000] * 4, trace(VALID_PATH)).ok
    # a state line the parser cannot read is not part of the answer (the operations are): no crash
    state = VALID_PATH.replace("Current State: 27:[26, 1]", f"Current State: {HUGE}:[{HUGE}]")
    assert check_path(TARGET, NUMS, state).reason == "ok"


@pytest.mark.parametrize(
    ("a", "op", "b", "expected"),
    [(3, "+", 4, 7), (3, "*", 4, 12), (4, "-", 3, 1), (3, "-", 3, 0), (3, "-", 4, None), (8, "/", 4, 2),
     (0, "/", 4, 0), (7, "/", 2, None), (4, "/", 0, None), (4, "%", 2, None), (4, "**", 2, None)],
)
def test_apply_operation(a, op, b, expected):
    assert apply_operation(a, op, b) == expected
