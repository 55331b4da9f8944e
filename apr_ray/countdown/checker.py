"""The strict checker: is a trace's answer a valid Countdown solution?

Replays the answer path's operations on the multiset of the problem's numbers: each operand must be
available (and is consumed), the arithmetic must be right, division exact, no negative intermediates,
the stated resulting numbers must match, and the last state must be exactly [target] (so every number
was used once). This is APR's `check_solution`, with the reference SoS checker's number-reuse bug fixed.
A trace whose join blocks show a spawn the protocol refuses (a child at the trace's own start node, or
two at one node) is rejected before its path is read.

Model output is untrusted: nothing is evaluated, work is linear in the input and capped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from apr_ray.countdown import text as T

MAX_INPUT_CHARS = 2_000_000  # longer input is rejected before any parsing
MAX_PATH_LINES = 256  # a valid path has ~3 lines per operation


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str  # "ok" or why it was rejected
    operations: list[str] = field(default_factory=list)  # the operations replayed

    def __bool__(self) -> bool:
        return self.ok


def _reject(reason: str, ops: list[str] | None = None) -> CheckResult:
    return CheckResult(False, reason, ops or [])


def apply_operation(a: int, op: str, b: int) -> int | None:
    """The result of one move under the Countdown rules, or None if the move is not allowed."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a >= b else None
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    return None


def check_trace(target: int, nums: list[int] | tuple[int, ...], trace: str) -> CheckResult:
    """Check a whole trace (root thread text): extract its answer path, then check the path."""
    if not isinstance(trace, str):
        return _reject(f"trace is {type(trace).__name__}, not str")
    if len(trace) > MAX_INPUT_CHARS:
        return _reject(f"input too long: {len(trace)} characters > {MAX_INPUT_CHARS}")
    join_error = _join_error(trace)
    if join_error:
        return _reject(f"malformed spawn: {join_error}")
    path = T.answer_path(trace)
    if path is None:
        return _reject("no goal reached: the trace has fewer than two goal lines")
    return check_path(target, nums, path)


def check_path(target: int, nums: list[int] | tuple[int, ...], path: str) -> CheckResult:
    """Check an answer path: `Exploring Operation` lines replayed from the problem's numbers, ending in
    the goal line."""
    if len(path) > MAX_INPUT_CHARS:
        return _reject(f"input too long: {len(path)} characters > {MAX_INPUT_CHARS}")
    problem_error = _problem_error(target, nums)
    if problem_error:
        return _reject(problem_error)
    lines = path.split("\n", MAX_PATH_LINES + 1)
    if len(lines) > MAX_PATH_LINES:
        return _reject(f"answer path longer than {MAX_PATH_LINES} lines")
    pool = Counter(nums)
    ops: list[str] = []
    reached = False
    for raw in lines:
        line = raw.strip()
        if not line.startswith("Exploring Operation:"):
            if T.GOAL_RE.match(line):
                reached = True
                value, goal = (int(x) for x in T.GOAL_RE.match(line).groups())
                if value != target or goal != target:
                    return _reject(f"goal line '{line}' does not name the target {target}", ops)
                break
            state = T.STATE_RE.match(line) if "Current State:" in line else None
            if state and int(state.group(1)) != target:
                return _reject(f"state line names target {state.group(1)}, the problem's is {target}", ops)
            continue
        m = T.EXPLORING_RE.match(line)
        if not m:
            return _reject(f"malformed operation line: {line[:80]!r}", ops)
        a, sym, b, stated, rest = int(m[1]), m[2], int(m[3]), int(m[4]), T.parse_nums(m[5])
        op = f"{a}{sym}{b}={stated}"
        for n in (a, b):
            pool[n] -= 1
            if pool[n] < 0:
                return _reject(f"operation {op}: number {n} is not available in {sorted(_elements(pool, n))}", ops)
        result = apply_operation(a, sym, b)
        if result is None:
            kind = "negative result" if sym == "-" else "division by zero" if b == 0 else "non-exact division"
            return _reject(f"operation {op}: {kind}", ops)
        if result != stated:
            return _reject(f"operation {op}: wrong arithmetic, {a}{sym}{b} is {result}", ops)
        pool[result] += 1
        ops.append(op)
        current = sorted(_elements(pool))
        if sorted(rest) != current:
            return _reject(f"operation {op}: stated resulting numbers {sorted(rest)} != actual {current}", ops)
    if not reached:
        return _reject("truncated: the answer path ends before its goal line", ops)
    left = sorted(_elements(pool))
    if left != [target]:
        if len(left) > 1:
            return _reject(f"numbers left unused: {left} (every number must be used once)", ops)
        return _reject(f"final value {left} is not the target {target}", ops)
    return CheckResult(True, "ok", ops)


def _join_error(trace: str) -> str | None:
    """Why the trace's join blocks show a spawn the protocol refuses (`AprProtocol.find_spawn`), if so: a
    child at the trace's own start node, or two children at one node. Such a join carries a child's whole
    solution into the root's text, where it would pass as the root's answer. The runtime never writes such
    a join; the check is here because the reward trusts only the checker, whoever wrote the trace.

    Linear in len(trace): join blocks are found by substring search and never overlap.
    """
    pos = trace.find(T.JOIN_OPEN)
    own = T.start_node(trace) if pos >= 0 else None
    while pos >= 0:
        end = trace.find(T.JOIN_CLOSE, pos)
        block = trace[pos + len(T.JOIN_OPEN) : end if end >= 0 else len(trace)]
        seen: set[str] = set()
        for raw in block.split("\n"):
            line = raw.strip()
            m = T.JOIN_GOAL_RE.match(line) or T.JOIN_NO_SOLUTION_RE.match(line)
            if not m:
                continue
            node_id = m[3]
            if node_id == own:
                return f"a join block names node #{node_id}, the trace's own start node"
            if node_id in seen:
                return f"a join block names node #{node_id} twice"
            seen.add(node_id)
        pos = trace.find(T.JOIN_OPEN, end) if end >= 0 else -1
    return None


def _problem_error(target: int, nums: list[int] | tuple[int, ...]) -> str | None:
    """Why no trace can solve this problem, if so. Problems come from our generator, but a corrupted record
    must get a reason, not crash the reward (str() of an int over 4300 digits raises)."""
    limit = 10**T.MAX_DIGITS
    if not 0 <= target < limit:
        return f"problem target outside 0..{limit - 1}: no trace can state it"
    if not all(0 <= n < limit for n in nums):
        return f"a problem number is outside 0..{limit - 1}: no trace can state it"
    return None


def _elements(pool: Counter, restore: int | None = None) -> list[int]:
    """The multiset's items; `restore` undoes the decrement that just drove one count negative."""
    if restore is not None:
        pool = pool.copy()
        pool[restore] += 1
    return [n for n, c in pool.items() for _ in range(max(c, 0))]
