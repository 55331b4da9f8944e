"""The thread protocol on the APR reference's own example: prompts, spawn parsing, child prompts, the join
block byte for byte, the answer; every malformed spawn request rejected with a reason; the serial
protocol; protocol lookup."""

import pytest

from apr_ray.countdown import text as T
from apr_ray.countdown.protocol import (
    AprProtocol,
    ProtocolError,
    SerialProtocol,
    Spawn,
    get_protocol,
    node_states,
)

APR = AprProtocol()

# shared/research/apr.md §1: the parent, its spawn block, its children and the join block, literally.
PROMPT = "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
PARENT = PROMPT + (
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
)
SPAWN_BLOCK = (
    "<Calling Sub Searches>\n"
    "<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
    "<Start Sub Search 1 at level 1> Moving to Node #0,1\n"
    "<End Calling Sub Searches>\n"
)
CHILD_0_PROMPT = "Moving to Node #0,0\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
CHILD_1_PROMPT = "Moving to Node #0,1\nCurrent State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
CHILD_0 = CHILD_0_PROMPT + (
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
CHILD_1 = CHILD_1_PROMPT + (
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
) + CHILD_1_PATH
JOINED = PARENT + (
    "<Sub Searches>\n"
    "<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
    "<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n"
) + CHILD_1_PATH + "<End Sub Searches>\n"


def test_root_prompts():
    assert APR.root_prompt(27, [22, 26, 31, 53]) == PROMPT
    assert APR.root_prompt(27, (22, 26, 31, 53), budget=10) == "Sub Call Budget: 10 " + PROMPT
    serial = SerialProtocol()
    assert serial.root_prompt(27, [22, 26, 31, 53]) == "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    assert serial.root_prompt(27, [22, 26, 31, 53], budget=512).startswith("Token Budget: 512 Current State: 27:")
    assert APR.condition(None) == serial.condition(None) == ""


def test_reference_spawn_children_and_join():
    spawn = APR.find_spawn(PARENT + SPAWN_BLOCK, depth=0, max_children=10)
    assert isinstance(spawn, Spawn)
    assert spawn.prefix == PARENT and spawn.requested == 2
    assert [(c.index, c.node_id, c.prompt) for c in spawn.children] == [
        (0, "0,0", CHILD_0_PROMPT),
        (1, "0,1", CHILD_1_PROMPT),
    ]
    assert APR.final_answer(CHILD_0) is None
    assert APR.final_answer(CHILD_1) == CHILD_1_PATH
    assert APR.join(spawn, 0, [CHILD_0, CHILD_1]) == JOINED
    # the parent then commits to the child's answer: its final answer is the root-to-goal path
    finished = JOINED + "27,27 equal: Goal Reached\n" + PROMPT + "...\n27,27 equal: Goal Reached\n"
    assert APR.find_spawn(finished, 0, 10) is None
    assert APR.final_answer(finished).startswith(PROMPT)


def test_spawn_after_a_budget_prefix_and_with_trailing_whitespace():
    spawn = APR.find_spawn("Sub Call Budget: 4 " + PARENT + SPAWN_BLOCK + "  \n\n", 0, 10)
    assert [c.prompt for c in spawn.children] == [CHILD_0_PROMPT, CHILD_1_PROMPT]


def test_join_of_children_that_did_not_run_or_found_nothing():
    spawn = APR.find_spawn(PARENT + SPAWN_BLOCK, 0, 10)
    joined = APR.join(spawn, 0, [None, "garbage"])
    assert joined == PARENT + (
        "<Sub Searches>\n"
        "<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
        "<No Solution in Sub Search 1 at level 1 at Node #0,1>\n"
        "<End Sub Searches>\n"
    )


def test_join_ends_a_path_without_final_newline():
    spawn = APR.find_spawn(PARENT + SPAWN_BLOCK, 0, 10)
    assert APR.join(spawn, 0, [CHILD_0, CHILD_1.rstrip("\n")]) == JOINED


def test_join_drops_a_child_answer_that_carries_protocol_blocks():
    # a child whose "answer" holds a spawn block must not plant it in the parent's prompt: the parent's
    # next request would then be rejected as an unclosed spawn whatever it writes
    spawn = APR.find_spawn(PARENT + SPAWN_BLOCK, 0, 10)
    for marker in (T.SPAWN_OPEN, T.SPAWN_CLOSE, T.JOIN_OPEN, T.JOIN_CLOSE):
        child = CHILD_1_PROMPT + "27,27 equal: Goal Reached\n" + marker + "\n27,27 equal: Goal Reached\n"
        joined = APR.join(spawn, 0, [None, child])
        assert "<No Solution in Sub Search 1 at level 1 at Node #0,1>" in joined
        assert joined[len(PARENT):].count(marker) == (1 if marker in (T.JOIN_OPEN, T.JOIN_CLOSE) else 0)
        assert APR.find_spawn(joined + "No solution found.\n", 0, 10) is None


def test_nested_spawn_from_a_child():
    # a child at depth 1 spawns at level 2, from nodes it generated below its own start node
    child = CHILD_1_PROMPT + (
        "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
        "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
        "Exploring Operation: 26-22=4, Resulting Numbers: [22, 4]\n"
        "Generated Node #0,1,1: 27:[22, 4] Operation: 26-22=4\n"
        "<Calling Sub Searches>\n"
        "<Start Sub Search 0 at level 2> Moving to Node #0,1,1\n"
        "<Start Sub Search 1 at level 2> Moving to Node #0,1,0\n"
        "<End Calling Sub Searches>\n"
    )
    spawn = APR.find_spawn(child, depth=1, max_children=10)
    assert [c.prompt for c in spawn.children] == [
        "Moving to Node #0,1,1\nCurrent State: 27:[22, 4], Operations: ['53-31=22', '26-22=4']\n",
        "Moving to Node #0,1,0\nCurrent State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n",
    ]
    joined = APR.join(spawn, 1, [None, None])
    assert "<No Solution in Sub Search 0 at level 2 at Node #0,1,1>\n" in joined
    with pytest.raises(ProtocolError, match="level 2, expected 1"):
        APR.find_spawn(child, depth=0, max_children=10)


def test_max_children_caps_the_children_not_the_request():
    spawn = APR.find_spawn(PARENT + SPAWN_BLOCK, 0, max_children=1)
    assert [c.node_id for c in spawn.children] == ["0,0"] and spawn.requested == 2
    assert APR.join(spawn, 0, [CHILD_0]).count(" in Sub Search ") == 1


def spawn_block(*lines: str) -> str:
    return "<Calling Sub Searches>\n" + "".join(line + "\n" for line in lines) + "<End Calling Sub Searches>\n"


@pytest.mark.parametrize(
    ("name", "context", "words"),
    [
        ("open without close", PARENT + "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n",
         "did not end"),
        ("close without open",
         PARENT + "<Start Sub Search 0 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>",
         "without"),
        ("no children", PARENT + spawn_block(), "no children"),
        ("index does not start at 0", PARENT + spawn_block("<Start Sub Search 1 at level 1> Moving to Node #0,0"),
         "expected sub search 0"),
        ("index repeated", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,0",
                                                "<Start Sub Search 0 at level 1> Moving to Node #0,1"),
         "expected sub search 1"),
        ("wrong level", PARENT + spawn_block("<Start Sub Search 0 at level 3> Moving to Node #0,0"),
         "level 3, expected 1"),
        ("unknown node", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,7"), "#0,7"),
        ("node id with garbage", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,x"),
         "malformed spawn line"),
        ("text inside the block", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,0", "hmm"),
         "malformed spawn line"),
        ("overlong line", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #" + "0," * 300 + "0"),
         "malformed spawn line"),
        ("too many lines", PARENT + spawn_block(*["<Start Sub Search 0 at level 1> Moving to Node #0,0"] * 1100),
         "longer than 1024"),
    ],
)
def test_malformed_spawn_requests_raise_with_a_reason(name, context, words):
    with pytest.raises(ProtocolError, match=words):
        APR.find_spawn(context, 0, 10)


CHILD_1_EXPANDED = CHILD_1_PROMPT + (
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
)


@pytest.mark.parametrize(
    ("name", "context", "depth", "words"),
    [
        ("root at its own start node", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0"), 0,
         "node #0, the thread's own start node"),
        ("budget-prefixed root at its own start node",
         "Sub Call Budget: 4 " + PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,1",
                                                     "<Start Sub Search 1 at level 1> Moving to Node #0"),
         0, "node #0, the thread's own start node"),
        ("child at its own start node",
         CHILD_1_EXPANDED + spawn_block("<Start Sub Search 0 at level 2> Moving to Node #0,1"), 1,
         "node #0,1, the thread's own start node"),
        ("same node twice", PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,1",
                                                 "<Start Sub Search 1 at level 1> Moving to Node #0,1"), 0,
         "node #0,1 twice"),
        ("same node twice past max_children",
         PARENT + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,0",
                              "<Start Sub Search 1 at level 1> Moving to Node #0,1",
                              "<Start Sub Search 2 at level 1> Moving to Node #0,0"), 0,
         "node #0,0 twice"),
    ],
)
def test_spawn_that_would_hand_back_the_thread_own_search_is_refused(name, context, depth, words):
    # a child at the thread's own start node (or two at one node) returns a solution the thread never
    # searched for; its join would pass the checker
    with pytest.raises(ProtocolError, match=words):
        APR.find_spawn(context, depth, 1)


def test_spawn_only_at_nodes_the_thread_generated():
    # a node the thread says it moved to, with the root's numbers, is not one it generated
    moved = PARENT + "Moving to Node #7\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
    with pytest.raises(ProtocolError, match="node #7, which the thread never generated"):
        APR.find_spawn(moved + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #7"), 0, 10)
    # re-declaring a generated node with other numbers does not change the state its child starts from
    rewritten = PARENT + "Moving to Node #0,1\nCurrent State: 27:[22, 26, 31, 53], Operations: []\n"
    spawn = APR.find_spawn(rewritten + spawn_block("<Start Sub Search 0 at level 1> Moving to Node #0,1"), 0, 10)
    assert spawn.children[0].prompt == CHILD_1_PROMPT


def test_spawns_below_the_start_node_are_accepted():
    budgeted = APR.find_spawn("Sub Call Budget: 4 " + PARENT + SPAWN_BLOCK, 0, 10)
    assert [c.node_id for c in budgeted.children] == ["0,0", "0,1"]
    below = spawn_block("<Start Sub Search 0 at level 2> Moving to Node #0,1,0")
    child = APR.find_spawn(CHILD_1_EXPANDED + below, 1, 10)
    assert [c.node_id for c in child.children] == ["0,1,0"]


def test_start_node():
    assert T.start_node(PARENT) == "0"
    assert T.start_node("Sub Call Budget: 4 " + PARENT) == "0"
    assert T.start_node(CHILD_1) == "0,1"
    assert T.start_node("Current State: 27:[1], Operations: []\n") is None
    assert T.start_node("Moving to Node #0,x\nMoving to Node #0\n") is None  # only the first line counts


def test_no_spawn_is_none():
    assert APR.find_spawn(PARENT, 0, 10) is None
    assert APR.find_spawn(JOINED + "No solution found.\n", 0, 10) is None
    assert APR.find_spawn("", 0, 10) is None


def test_node_states():
    states = node_states("Sub Call Budget: 3 " + PARENT + "Generated Node #5,1: 27:[1, 2] Operation: 1+1=2\n")
    assert states == {
        "0": (27, [22, 26, 31, 53], []),
        "0,0": (27, [26, 31, 31], ["53-22=31"]),
        "0,1": (27, [22, 26, 22], ["53-31=22"]),
    }  # 5,1 has no known parent: skipped
    # a Moving line declares a node only when the next line is its state
    assert node_states("Moving to Node #3\nhello\nCurrent State: 27:[1, 2], Operations: []\n") == {}


def test_runtime_text_and_serial_protocol():
    assert APR.writes_runtime_text("...\n<Sub Searches>\n") and not APR.writes_runtime_text(SPAWN_BLOCK)
    serial = SerialProtocol()
    assert serial.find_spawn(PARENT + SPAWN_BLOCK, 0, 10) is None
    assert not serial.writes_runtime_text("<Sub Searches>")
    assert serial.final_answer(CHILD_1) == CHILD_1_PATH
    with pytest.raises(ProtocolError, match="never spawns"):
        serial.join(Spawn("", [], 0), 0, [])


def test_get_protocol():
    assert isinstance(get_protocol("apr"), AprProtocol) and isinstance(get_protocol("sosp"), SerialProtocol)
    with pytest.raises(ValueError, match="'threadweaver'"):
        get_protocol("threadweaver")


def test_answer_path_edges():
    goal = "27,27 equal: Goal Reached"
    assert T.answer_path("") is None
    assert T.answer_path(goal + "\n") is None  # one goal line: no summary path
    assert T.answer_path(goal + "\n" + goal) == goal  # unterminated last line
    assert T.answer_path(goal + "\n" + goal + "\ntrailing") == goal + "\n"
    assert T.answer_path(goal + " x" + T.GOAL_LINE_SUFFIX + "\n") is None  # both on one line
