"""The thread protocol: how a thread's text asks for children, and how their results come back.

The runtime only talks to `ThreadProtocol`: did this thread spawn, which children with which prompts,
what join text resumes the parent, what final answer did a finished thread give. `AprProtocol` is the
APR reference's text format (spawn block + EOS; the runtime writes the join block); `SerialProtocol`
is SoS+ (one thread, never spawns). Another syntax (e.g. ThreadWeaver's `<Parallel>` blocks) is one
more subclass, with no change to the runtime.

Model output is untrusted: the parsers are bounded (line and child caps) and raise `ProtocolError`
with a reason instead of guessing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from apr_ray.countdown import text as T

MAX_LINE_CHARS = 512  # longer lines are never part of a well-formed trace; skipped by the scanners
MAX_SPAWN_LINES = 1024  # hard cap on lines read inside one spawn block
BLOCK_MARKERS = (T.SPAWN_OPEN, T.SPAWN_CLOSE, T.JOIN_OPEN, T.JOIN_CLOSE)


class ProtocolError(ValueError):
    """A thread's output breaks the protocol; the message says how."""


@dataclass(frozen=True)
class ChildSpec:
    index: int  # position in the spawn block (the i of `<Start Sub Search i ...>`)
    node_id: str  # the search node the child starts from
    prompt: str  # the child's whole prompt


@dataclass(frozen=True)
class Spawn:
    prefix: str  # the parent's text before its spawn block; the continuation starts from it
    children: list[ChildSpec]
    requested: int  # children the spawn block named (may exceed len(children) when capped)


class ThreadProtocol(ABC):
    name: str

    @abstractmethod
    def condition(self, budget: int | None) -> str:
        """The root prompt's conditioning prefix for `budget` (thread count or tokens); "" for None."""

    @abstractmethod
    def root_prompt(self, target: int, nums: list[int] | tuple[int, ...], budget: int | None = None) -> str:
        """The prompt of a tree's root thread, conditioned on `budget` when given."""

    @abstractmethod
    def find_spawn(self, context: str, depth: int, max_children: int) -> Spawn | None:
        """If the thread's text (prompt + output) ends in a spawn request, parse it; None if it does not
        spawn. Raises ProtocolError for a malformed request."""

    @abstractmethod
    def join(self, spawn: Spawn, depth: int, child_texts: list[str | None]) -> str:
        """The parent's new prompt after its children finished (their whole texts; None = not run)."""

    @abstractmethod
    def final_answer(self, context: str) -> str | None:
        """The answer path a finished thread reports, None if it reached no goal."""

    def writes_runtime_text(self, output: str) -> bool:
        """True if the model wrote text only the runtime may write (e.g. a join block)."""
        return False


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if len(line) <= MAX_LINE_CHARS]


State = tuple[int, list[int], list[str]]  # (target, numbers, operations so far)


def node_states(context: str) -> dict[str, State]:
    """Search-node states a thread's text declares: node id -> (target, numbers, operations).

    `Moving to Node #X` followed by a `Current State` line declares X; `Generated Node #X,k: ...
    Operation: op` declares X,k from its parent's operations plus op.
    """
    return _scan_nodes(context)[0]


def generated_node_states(context: str) -> dict[str, State]:
    """The states of the nodes the thread itself generated (`Generated Node` lines): the only ones it may
    spawn children at. A node declared by a `Moving to Node` line is one the thread was handed (its own
    start), or one it claims to have moved to: spawning there would hand back a search it never did."""
    return _scan_nodes(context)[1]


def _scan_nodes(context: str) -> tuple[dict[str, State], dict[str, State]]:
    """(every declared node's state, the states as the `Generated Node` lines declared them): a later
    `Moving to Node` line may not rewrite the state a spawned child starts from."""
    states: dict[str, State] = {}
    generated: dict[str, State] = {}
    pending: str | None = None
    for line in _lines(context):
        if "Moving to Node #" in line:
            m = T.MOVING_RE.match(line)
            pending = m.group(1) if m else None
            continue
        if pending is not None and "Current State:" in line:
            m = T.STATE_RE.match(line)
            if m:
                states[pending] = (int(m[1]), T.parse_nums(m[2]), T.parse_ops(m[3]))
            pending = None
            continue
        pending = None
        if line.startswith("Generated Node #"):
            m = T.GENERATED_RE.match(line)
            if not m:
                continue
            node_id, target, nums = m[1], int(m[2]), T.parse_nums(m[3])
            parent = T.parent_node_id(node_id)
            if parent in states:
                op = f"{m[4]}{m[5]}{m[6]}={m[7]}"
                states[node_id] = generated[node_id] = (target, nums, states[parent][2] + [op])
    return states, generated


def child_prompt(node_id: str, target: int, nums: list[int], ops: list[str]) -> str:
    return T.moving_line(node_id) + T.state_line(target, nums, ops)


class AprProtocol(ThreadProtocol):
    """APR reference format. Prompts end with a newline; a spawn block is the end of its request."""

    name = "apr"

    def condition(self, budget):
        return f"Sub Call Budget: {budget} " if budget is not None else ""

    def root_prompt(self, target, nums, budget=None):
        return self.condition(budget) + child_prompt("0", target, list(nums), [])

    def find_spawn(self, context: str, depth: int, max_children: int) -> Spawn | None:
        tail = context.rstrip()
        if not tail.endswith(T.SPAWN_CLOSE):
            # prompts never hold a spawn block (the join replaced it), so one here is the model's, unclosed
            if T.SPAWN_OPEN in context:
                raise ProtocolError(f"{T.SPAWN_OPEN} opened but the request did not end with {T.SPAWN_CLOSE}")
            return None
        start = tail.rfind(T.SPAWN_OPEN + "\n")
        if start < 0:
            raise ProtocolError(f"{T.SPAWN_CLOSE} without {T.SPAWN_OPEN}")
        block = tail[start + len(T.SPAWN_OPEN) + 1 : len(tail) - len(T.SPAWN_CLOSE)]
        block_lines = block.split("\n", MAX_SPAWN_LINES)
        if len(block_lines) > MAX_SPAWN_LINES:
            raise ProtocolError(f"spawn block longer than {MAX_SPAWN_LINES} lines")
        prefix = context[:start]
        states = generated_node_states(prefix)
        # A child at the thread's own start node, or two children at one node, hands back a search the
        # thread never did: its join would carry a whole solution for a handful of the thread's own tokens.
        own = T.start_node(prefix)
        named: set[str] = set()
        requested: list[tuple[int, str]] = []
        for line in block_lines:
            if not line.strip():
                continue
            m = T.SPAWN_CHILD_RE.match(line.strip()) if len(line) <= MAX_LINE_CHARS else None
            if not m:
                raise ProtocolError(f"malformed spawn line: {line[:80]!r}")
            index, level, node_id = int(m[1]), int(m[2]), m[3]
            if index != len(requested):
                raise ProtocolError(f"spawn line {line[:80]!r}: expected sub search {len(requested)}")
            if level != depth + 1:
                raise ProtocolError(f"spawn line {line[:80]!r}: level {level}, expected {depth + 1}")
            if node_id == own:
                raise ProtocolError(f"spawn names node #{node_id}, the thread's own start node")
            if node_id in named:
                raise ProtocolError(f"spawn names node #{node_id} twice")
            named.add(node_id)
            requested.append((index, node_id))
        if not requested:
            raise ProtocolError("spawn block names no children")
        children = []
        for index, node_id in requested[:max_children]:
            if node_id not in states:
                raise ProtocolError(f"spawn names node #{node_id}, which the thread never generated")
            target, nums, ops = states[node_id]
            children.append(ChildSpec(index, node_id, child_prompt(node_id, target, nums, ops)))
        return Spawn(prefix=prefix, children=children, requested=len(requested))

    def join(self, spawn: Spawn, depth: int, child_texts: list[str | None]) -> str:
        parts = [spawn.prefix, T.JOIN_OPEN + "\n"]
        for child, child_text in zip(spawn.children, child_texts, strict=True):
            path = T.answer_path(child_text) if child_text is not None else None
            if path is not None and any(marker in path for marker in BLOCK_MARKERS):
                # not a solution path; copied into the parent's prompt it would plant a spawn block there,
                # which find_spawn rejects whatever the parent writes next
                path = None
            if path is not None:
                parts.append(T.join_goal_line(child.index, depth + 1, child.node_id))
                parts.append(path if path.endswith("\n") else path + "\n")
            else:
                parts.append(T.join_no_solution_line(child.index, depth + 1, child.node_id))
        parts.append(T.JOIN_CLOSE + "\n")
        return "".join(parts)

    def final_answer(self, context: str) -> str | None:
        return T.answer_path(context)

    def writes_runtime_text(self, output: str) -> bool:
        return T.JOIN_OPEN in output


class SerialProtocol(ThreadProtocol):
    """SoS+: one thread that never spawns; `budget` is the reference's token-budget condition."""

    name = "sosp"

    def condition(self, budget):
        return f"Token Budget: {budget} " if budget is not None else ""

    def root_prompt(self, target, nums, budget=None):
        return self.condition(budget) + T.state_line(target, list(nums), [])

    def find_spawn(self, context, depth, max_children):
        return None

    def join(self, spawn, depth, child_texts):
        raise ProtocolError("the serial protocol never spawns")

    def final_answer(self, context: str) -> str | None:
        return T.answer_path(context)


PROTOCOLS: dict[str, type[ThreadProtocol]] = {"apr": AprProtocol, "sosp": SerialProtocol}


def get_protocol(name: str) -> ThreadProtocol:
    try:
        return PROTOCOLS[name]()
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}") from None
