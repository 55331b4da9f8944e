"""The validation ladder: metrics that move long before accuracy does.

A tiny model trained for minutes writes traces of the right shape well before it solves problems, so
validation reports rungs of increasing difficulty, each the share of the one below it that passes:
1. well-formed threads: every line is a line of the trace format and the thread ended cleanly;
2. moves from the state: both operands of an `Exploring Operation` line are numbers of the thread's
   current state (the most recent `Current State` line);
3. correct arithmetic: the move's stated result is what the Countdown rules give;
4. solved trees (the strict checker's verdict, already on the tree record);
plus the share of trees that spawn children and the tree sizes.

Owns the per-thread line scan, the per-tree aggregates and the summary dict whose keys are the metric
names. Pure Python: imports only `types` and `countdown`; must not import Ray, torch or vLLM (text comes
in through a `decode` callable). Model output is untrusted: lines are matched with the bounded regexes of
`countdown.text`, at most MAX_LINES lines of at most MAX_LINE_CHARS characters are examined per thread,
and nothing here raises on any text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import apply_operation
from apr_ray.countdown.protocol import MAX_LINE_CHARS
from apr_ray.types import EndReason, TreeRecord

MAX_LINES = 4096  # lines examined per thread; a thread with more is not well formed (it was not all read)
MAX_STATE_LOOKBACK = 64  # malformed "Current State" lines skipped while looking for the prompt's last state
CLEAN_ENDS = (EndReason.EOS, EndReason.SPAWN)
# lines a well-formed thread may end with: a goal (a solution path's end), giving up, a spawn request, or
# (SoS+) leaving the sub searches it found the goal in
_FINAL_EXACT = (T.NO_SOLUTION, T.SPAWN_CLOSE)
_EXACT_LINES = frozenset((T.SPAWN_OPEN, T.SPAWN_CLOSE, T.JOIN_OPEN, T.JOIN_CLOSE, T.NO_SOLUTION))
_STATE_HEAD = "Current State: "
_MOVING_HEAD = "Moving to Node #"

SUMMARY_KEYS = (
    "threads_well_formed",
    "moves_from_state",
    "moves_correct_arithmetic",
    "moves_per_thread",
    "solved",
    "spawn_share",
    "threads_per_tree",
    "tokens_total_mean",
    "tokens_critical_path_mean",
    "num_trees",
)


@dataclass
class ThreadLadder:
    """Counts for one thread record's generated text."""

    lines: int = 0  # non-empty lines examined
    well_formed_lines: int = 0  # of those, lines of the trace format
    moves: int = 0  # "Exploring Operation" lines that parse
    moves_from_state: int = 0  # both operands in the current state's numbers (as a multiset)
    moves_correct: int = 0  # a op b is the stated result under the Countdown rules
    well_formed: bool = False  # every line well formed, the last one an ending, and the request ended cleanly


@dataclass
class TreeLadder:
    """One tree's sums over its thread records, with its verdict and size."""

    requests: int = 0  # thread records (engine requests; a thread that spawned has several)
    requests_well_formed: int = 0
    threads: int = 0  # logical threads (root + children)
    lines: int = 0
    well_formed_lines: int = 0
    moves: int = 0
    moves_from_state: int = 0
    moves_correct: int = 0
    solved: bool = False
    spawned: bool = False
    tokens_total: int = 0
    tokens_critical_path: int = 0


def _state_nums(line: str, strict: bool) -> list[int] | None:
    """The numbers of a `Current State` line; None if it is not one. `strict`: nothing before the
    phrase (STATE_RE itself tolerates a prefix, for the root's conditioned first line)."""
    if len(line) > MAX_LINE_CHARS:
        return None
    m = T.STATE_RE.match(line)
    if m is None or (strict and m.start(1) != len(_STATE_HEAD)):
        return None
    return T.parse_nums(m[2])


def _context_state(prompt: str) -> list[int] | None:
    """The numbers of the prompt's last state line outside a join block.

    A continuation's prompt ends with the join block, whose lines are the children's paths: the parent's
    own state is the one it stood at before spawning. The search runs backwards with `rfind`, so the work
    is linear in the prompt whatever it holds.
    """
    cut = prompt.rfind(T.JOIN_OPEN)
    end = len(prompt) if cut < 0 else cut
    for _ in range(MAX_STATE_LOOKBACK):
        pos = prompt.rfind(_STATE_HEAD, 0, end)
        if pos < 0:
            return None
        start = prompt.rfind("\n", 0, pos) + 1
        stop = prompt.find("\n", pos)
        nums = _state_nums(prompt[start : len(prompt) if stop < 0 else stop], strict=False)
        if nums is not None:
            return nums
        end = pos
    return None


def _classify(line: str, first_of_thread: bool) -> tuple[bool, list[int] | None, tuple[int, str, int, int] | None]:
    """(is the line well formed, the state's numbers if it is a state line, the move if it is one)."""
    if first_of_thread:
        cond = T.CONDITION_RE.match(line)
        if cond is not None:
            line = cond[1]
    if line.startswith("Exploring Operation: "):
        m = T.EXPLORING_RE.match(line)
        return (True, None, (int(m[1]), m[2], int(m[3]), int(m[4]))) if m else (False, None, None)
    if line.startswith(_STATE_HEAD):
        nums = _state_nums(line, strict=True)
        return nums is not None, nums, None
    if line.startswith(_MOVING_HEAD):
        m = T.MOVING_RE.match(line)
        # MOVING_RE tolerates a prefix; a well-formed moving line has none
        return m is not None and m.start(1) == len(_MOVING_HEAD), None, None
    if line in _EXACT_LINES:
        return True, None, None
    for regex in (T.GENERATED_RE, T.GOAL_RE, T.UNEQUAL_RE, T.SPAWN_CHILD_RE, T.JOIN_GOAL_RE,
                  T.JOIN_NO_SOLUTION_RE, T.SUB_SEARCH_START_RE, T.SUB_SEARCH_EXIT_RE,
                  T.SUB_SEARCH_NO_SOLUTION_RE):
        if regex.match(line):
            return True, None, None
    return False, None, None


def _is_ending(line: str) -> bool:
    if line in _FINAL_EXACT:
        return True
    return len(line) <= MAX_LINE_CHARS and (T.GOAL_RE.match(line) or T.SUB_SEARCH_EXIT_RE.match(line)) is not None


def thread_ladder(prompt_text: str, output_text: str, end_reason: EndReason) -> ThreadLadder:
    """Ladder counts of one thread record: its output's lines, read with its prompt as context.

    A move is from the state when both operands are in the numbers of the most recent well-formed state
    line before it: in the output, else the prompt's last one (a child's prompt holds its start state).
    A well-formed thread has at least one line, only lines of the trace format (the thread's first line,
    which is the output's only when the prompt is empty, may carry the budget condition), ends with a
    goal line, "No solution found.", a spawn block or (SoS+) a sub search's exit, and ended at EOS or
    with a spawn: an empty output, or one cut at a limit, is not well formed however clean its lines
    (else a model that emits EOS at once would score 100%).
    """
    out = ThreadLadder()
    state = _context_state(prompt_text) if prompt_text else None
    state_counts = Counter(state) if state is not None else None
    pieces = output_text.split("\n", MAX_LINES)
    # split's last piece is the unread rest once MAX_LINES newlines were seen
    overflow = len(pieces) > MAX_LINES and pieces[MAX_LINES] != ""
    first_of_thread = not prompt_text.strip()
    last = ""
    for line in pieces[:MAX_LINES]:
        if not line:
            continue
        out.lines += 1
        last = line
        if len(line) > MAX_LINE_CHARS:
            first_of_thread = False
            continue
        ok, nums, move = _classify(line, first_of_thread)
        first_of_thread = False
        out.well_formed_lines += ok
        if nums is not None:
            state_counts = Counter(nums)
        if move is not None:
            a, sym, b, stated = move
            out.moves += 1
            if state_counts is not None:
                need = Counter((a, b))
                out.moves_from_state += all(state_counts[n] >= k for n, k in need.items())
            out.moves_correct += apply_operation(a, sym, b) == stated
    out.well_formed = (
        out.lines > 0
        and out.well_formed_lines == out.lines
        and not overflow
        and _is_ending(last)
        and end_reason in CLEAN_ENDS
    )
    return out


def tree_ladder(tree: TreeRecord, decode: Callable[[list[int]], str]) -> TreeLadder:
    """Sums of `thread_ladder` over a tree's records. `decode` turns ids into text and must drop special
    tokens (BOS, EOS), as `rollout.engines.TextCodec.decode` does; with them, every output's last line
    would end in "</s>" and no thread would be well formed."""
    out = TreeLadder(
        requests=len(tree.threads),
        threads=len({r.thread_id for r in tree.threads}),
        solved=bool(tree.correct),
        spawned=tree.metrics.num_spawns > 0,
        tokens_total=tree.metrics.tokens_total,
        tokens_critical_path=tree.metrics.tokens_critical_path,
    )
    for rec in tree.threads:
        t = thread_ladder(decode(rec.prompt_ids), decode(rec.output_ids), rec.end_reason)
        out.requests_well_formed += t.well_formed
        out.lines += t.lines
        out.well_formed_lines += t.well_formed_lines
        out.moves += t.moves
        out.moves_from_state += t.moves_from_state
        out.moves_correct += t.moves_correct
    return out


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def summarize(trees: Sequence[TreeRecord], decode: Callable[[list[int]], str]) -> dict[str, float]:
    """The ladder over a set of trees, keyed by SUMMARY_KEYS. Every value is a float; shares are in
    [0, 1]; with no trees (or no moves, no threads) the affected values are 0.0, never NaN.

    threads_well_formed is per thread record (engine request); moves_per_thread and threads_per_tree
    count logical threads (root + children), so moves per tree = moves_per_thread * threads_per_tree.
    """
    ladders = [tree_ladder(tree, decode) for tree in trees]
    n = len(ladders)

    def total(name: str) -> int:
        return sum(int(getattr(ladder, name)) for ladder in ladders)

    moves, threads = total("moves"), total("threads")
    return {
        "threads_well_formed": _share(total("requests_well_formed"), total("requests")),
        "moves_from_state": _share(total("moves_from_state"), moves),
        "moves_correct_arithmetic": _share(total("moves_correct"), moves),
        "moves_per_thread": _share(moves, threads),
        "solved": _share(total("solved"), n),
        "spawn_share": _share(total("spawned"), n),
        "threads_per_tree": _share(threads, n),
        "tokens_total_mean": _share(total("tokens_total"), n),
        "tokens_critical_path_mean": _share(total("tokens_critical_path"), n),
        "num_trees": float(n),
    }
