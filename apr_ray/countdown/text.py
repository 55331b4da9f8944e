"""The trace text format of the APR reference implementation: line templates and bounded parsers.

Solvers write these lines, the checker and the thread protocol read them. Every template is the exact
f-string of the reference (shared/research/apr.md §1), so reference demonstrations and checkpoints work
here unchanged. Each line ends with "\\n".

Parsers treat their input as untrusted model output: anchored regexes with bounded repetition, numbers
capped at MAX_DIGITS digits, list lengths capped, no eval.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_DIGITS = 12  # far above any Countdown value; keeps int() cheap on hostile input
MAX_LIST_LEN = 16  # more operands than any supported problem

GOAL_LINE_SUFFIX = " equal: Goal Reached"
SPAWN_OPEN = "<Calling Sub Searches>"
SPAWN_CLOSE = "<End Calling Sub Searches>"
JOIN_OPEN = "<Sub Searches>"
JOIN_CLOSE = "<End Sub Searches>"
NO_SOLUTION = "No solution found."


def fmt_nums(nums: Sequence[int]) -> str:
    """Python's list repr, as the reference prints `[22, 26, 31, 53]`."""
    return "[" + ", ".join(str(n) for n in nums) + "]"


def fmt_ops(ops: Sequence[str]) -> str:
    """Python's list-of-str repr, as the reference prints `['53-22=31', '22/22=1']`."""
    return "[" + ", ".join(f"'{op}'" for op in ops) + "]"


def state_line(target: int, nums: Sequence[int], ops: Sequence[str]) -> str:
    return f"Current State: {target}:{fmt_nums(nums)}, Operations: {fmt_ops(ops)}\n"


def moving_line(node_id: str) -> str:
    return f"Moving to Node #{node_id}\n"


def exploring_line(op: str, nums: Sequence[int]) -> str:
    return f"Exploring Operation: {op}, Resulting Numbers: {fmt_nums(nums)}\n"


def generated_line(node_id: str, target: int, nums: Sequence[int], op: str) -> str:
    return f"Generated Node #{node_id}: {target}:{fmt_nums(nums)} Operation: {op}\n"


def goal_line(target: int) -> str:
    return f"{target},{target}{GOAL_LINE_SUFFIX}\n"


def unequal_line(value: int, target: int) -> str:
    return f"{value},{target} unequal: No Solution\n"


def spawn_child_line(index: int, level: int, node_id: str) -> str:
    return f"<Start Sub Search {index} at level {level}> Moving to Node #{node_id}\n"


def join_no_solution_line(index: int, level: int, node_id: str) -> str:
    return f"<No Solution in Sub Search {index} at level {level} at Node #{node_id}>\n"


def join_goal_line(index: int, level: int, node_id: str) -> str:
    return f"<Goal Reached in Sub Search {index} at level {level} at Node #{node_id}>\n"


# --- parsing -------------------------------------------------------------------------------------

_NUM = rf"\d{{1,{MAX_DIGITS}}}"
_NODE_ID = r"\d{1,6}(?:,\d{1,6}){0,32}"
_NUM_LIST = rf"\[((?:{_NUM}(?:, {_NUM}){{0,{MAX_LIST_LEN - 1}}})?)\]"
_OP = rf"({_NUM})([+\-*/])({_NUM})=({_NUM})"
_OPS_LIST = rf"\[((?:'{_NUM}[+\-*/]{_NUM}={_NUM}'(?:, '{_NUM}[+\-*/]{_NUM}={_NUM}'){{0,{MAX_LIST_LEN - 1}}})?)\]"

STATE_RE = re.compile(rf"^(?:.*?)Current State: ({_NUM}):{_NUM_LIST}, Operations: {_OPS_LIST}$")
MOVING_MARK = "Moving to Node #"
MOVING_RE = re.compile(rf"^(?:.*?){MOVING_MARK}({_NODE_ID})$")
_NODE_ID_RE = re.compile(_NODE_ID)
EXPLORING_RE = re.compile(rf"^Exploring Operation: {_OP}, Resulting Numbers: {_NUM_LIST}$")
GENERATED_RE = re.compile(rf"^Generated Node #({_NODE_ID}): ({_NUM}):{_NUM_LIST} Operation: {_OP}$")
GOAL_RE = re.compile(rf"^({_NUM}),({_NUM}) equal: Goal Reached$")
SPAWN_CHILD_RE = re.compile(rf"^<Start Sub Search (\d{{1,6}}) at level (\d{{1,3}})> Moving to Node #({_NODE_ID})$")
UNEQUAL_RE = re.compile(rf"^({_NUM}),({_NUM}) unequal: No Solution$")
JOIN_GOAL_RE = re.compile(rf"^<Goal Reached in Sub Search (\d{{1,6}}) at level (\d{{1,3}}) at Node #({_NODE_ID})>$")
JOIN_NO_SOLUTION_RE = re.compile(
    rf"^<No Solution in Sub Search (\d{{1,6}}) at level (\d{{1,3}}) at Node #({_NODE_ID})>$"
)
# SoS+ serial sub searches (the reference's "promising" dives; written by solvers._sosp_search)
SUB_SEARCH_START_RE = re.compile(rf"^Start Sub Search at level (\d{{1,3}}): Moving to Node #({_NODE_ID})$")
SUB_SEARCH_EXIT_RE = re.compile(r"^Exit Sub Search at level (\d{1,3})$")
SUB_SEARCH_NO_SOLUTION_RE = re.compile(r"^No solution found in sub search$")
# the root prompt's conditioning prefix (protocol.AprProtocol / SerialProtocol.condition); group 1: the rest
CONDITION_RE = re.compile(rf"^(?:Sub Call Budget|Token Budget): {_NUM} (.*)$")


def parse_nums(body: str) -> list[int]:
    return [int(x) for x in body.split(", ")] if body else []


def parse_ops(body: str) -> list[str]:
    return [x.strip("'") for x in body.split(", ")] if body else []


def start_node(text: str) -> str | None:
    """The node an APR thread starts from: the node of the text's first `Moving to Node #` line, which is
    its prompt's (a root prompt's may follow a condition prefix). None when that line names no node id.

    Linear in len(text): one search, one bounded match.
    """
    at = text.find(MOVING_MARK)
    if at < 0:
        return None
    end = text.find("\n", at)
    m = _NODE_ID_RE.fullmatch(text, at + len(MOVING_MARK), end if end >= 0 else len(text))
    return m.group(0) if m else None


def parent_node_id(node_id: str) -> str | None:
    head, sep, _ = node_id.rpartition(",")
    return head if sep else None


def answer_path(text: str) -> str | None:
    """The solution path a finished trace reports: the text after its second-to-last goal line, through
    its last goal line (the reference's `get_search_result`). None when the trace reached no goal.

    Linear in len(text): two reverse searches, no regex over the whole input.
    """
    last = text.rfind(GOAL_LINE_SUFFIX)
    if last < 0:
        return None
    before = text.rfind(GOAL_LINE_SUFFIX, 0, last)
    if before < 0:
        return None
    start = text.find("\n", before)
    end = text.find("\n", last)
    end = len(text) if end < 0 else end + 1
    if start < 0 or start + 1 >= end:
        return None
    return text[start + 1 : end]
