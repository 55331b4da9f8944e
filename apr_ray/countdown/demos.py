"""Demonstrations as training sequences: flatten a solver's thread tree into per-thread (prompt,
completion) pairs, and validate demonstrations in the APR reference layout.

Flattening uses the same `ThreadProtocol` the runtime uses (child prompts from `find_spawn`, join text
from `join`), so a demonstration's sequences are exactly the requests the runtime would send and the
completions the model should write; a demonstration that disagrees with the protocol is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from apr_ray.countdown import text as T
from apr_ray.countdown.checker import check_trace
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import AprProtocol, ProtocolError, SerialProtocol, Spawn, child_prompt
from apr_ray.countdown.solvers import ThreadDemo

MAX_DEMO_THREADS = 4096  # a reference demo has at most ~11; bounds work on corrupted input
MAX_DEMO_DEPTH = 8


class DemoError(ValueError):
    """A demonstration that is not a valid trace; the message says where."""


@dataclass(frozen=True)
class ThreadSequence:
    """One request of a demonstration, as the runtime would issue it."""

    thread_id: int
    parent_thread_id: int  # -1 for the root
    depth: int
    segment: int
    prompt: str
    completion: str  # what the model should write; the learner appends EOS


@dataclass(frozen=True)
class Demo:
    problem: Problem
    kind: str  # "apr" or "sosp"
    sequences: list[ThreadSequence]
    solved: bool
    spawns: int
    children_per_spawn: float


def demo_from_trace_dict(obj: object, where: str = "trace_dict", depth: int = 0) -> ThreadDemo:
    """Parse the reference's `{"main_calls": [...], "sub_calls": [[...], ...]}` into a ThreadDemo."""
    if depth > MAX_DEMO_DEPTH:
        raise DemoError(f"{where}: nested deeper than {MAX_DEMO_DEPTH} levels")
    if not isinstance(obj, dict):
        raise DemoError(f"{where}: expected an object with main_calls and sub_calls, got {type(obj).__name__}")
    main, sub = obj.get("main_calls"), obj.get("sub_calls", [])
    if not isinstance(main, list) or not main or not all(isinstance(s, str) for s in main):
        raise DemoError(f"{where}.main_calls: expected a non-empty list of strings")
    if not isinstance(sub, list) or not all(isinstance(group, list) for group in sub):
        raise DemoError(f"{where}.sub_calls: expected a list of lists")
    children = [
        [demo_from_trace_dict(child, f"{where}.sub_calls[{k}][{i}]", depth + 1) for i, child in enumerate(group)]
        for k, group in enumerate(sub)
    ]
    return ThreadDemo(segments=list(main), children=children)


def flatten_apr(problem: Problem, demo: ThreadDemo, budget: int | None = None) -> Demo:
    """Per-thread sequences of a parallel demonstration; raises DemoError where it breaks the protocol.

    `budget` prefixes the root's prompts with the thread-count condition (`Sub Call Budget: N `).
    """
    protocol = AprProtocol()
    out: list[ThreadSequence] = []
    spawn_sizes: list[int] = []
    condition = protocol.condition(budget)
    next_id = iter(range(1, MAX_DEMO_THREADS + 2))

    def walk(thread: ThreadDemo, prompt: str, thread_id: int, parent_id: int, depth: int, where: str) -> str:
        if len(thread.children) != len(thread.segments) - 1:
            raise DemoError(f"{where}: {len(thread.segments)} main calls need {len(thread.segments) - 1} sub-call groups, got {len(thread.children)}")
        cond = condition if depth == 0 else ""
        for k, segment in enumerate(thread.segments):
            if not segment.startswith(prompt):
                raise DemoError(f"{where}.main_calls[{k}]: does not start with the expected prompt {prompt[:120]!r}")
            out.append(ThreadSequence(thread_id, parent_id, depth, k, cond + prompt, segment[len(prompt):]))
            if len(out) > MAX_DEMO_THREADS:
                raise DemoError(f"{where}: more than {MAX_DEMO_THREADS} thread requests")
            if k == len(thread.segments) - 1:
                if protocol.writes_runtime_text(segment[len(prompt):]) or T.SPAWN_OPEN in segment[len(prompt):]:
                    raise DemoError(f"{where}.main_calls[{k}]: the last call must not spawn")
                return segment
            try:
                spawn = protocol.find_spawn(segment, depth, max_children=MAX_DEMO_THREADS)
            except ProtocolError as err:
                raise DemoError(f"{where}.main_calls[{k}]: {err}") from None
            if spawn is None:
                raise DemoError(f"{where}.main_calls[{k}]: a call followed by sub calls must end in a spawn block")
            kids = thread.children[k]
            if len(kids) != len(spawn.children):
                raise DemoError(f"{where}.sub_calls[{k}]: {len(kids)} sub calls for {len(spawn.children)} spawned nodes")
            spawn_sizes.append(len(kids))
            texts = []
            for i, (child, spec) in enumerate(zip(kids, spawn.children)):
                texts.append(walk(child, spec.prompt, next(next_id), thread_id, depth + 1, f"{where}.sub_calls[{k}][{i}]"))
            prompt = protocol.join(spawn, depth, texts)
        raise AssertionError("unreachable")

    final = walk(demo, child_prompt("0", problem.target, list(problem.nums), []), 0, -1, 0, "trace_dict")
    solved = T.answer_path(final) is not None
    if solved:
        verdict = check_trace(problem.target, problem.nums, final)
        if not verdict.ok:
            raise DemoError(f"trace_dict: claims the goal but fails the checker: {verdict.reason}")
    return Demo(problem, "apr", out, solved, len(spawn_sizes),
                sum(spawn_sizes) / len(spawn_sizes) if spawn_sizes else 0.0)


def flatten_sosp(problem: Problem, trace: str, budget: int | None = None) -> Demo:
    """The one sequence of a serial SoS+ demonstration."""
    protocol = SerialProtocol()
    prompt = protocol.root_prompt(problem.target, problem.nums)
    if not trace.startswith(prompt):
        raise DemoError(f"SoS+ trace does not start with {prompt!r}")
    final = trace
    solved = T.answer_path(final) is not None
    if solved:
        verdict = check_trace(problem.target, problem.nums, final)
        if not verdict.ok:
            raise DemoError(f"SoS+ trace claims the goal but fails the checker: {verdict.reason}")
    seq = ThreadSequence(0, -1, 0, 0, protocol.condition(budget) + prompt, trace[len(prompt):])
    return Demo(problem, "sosp", [seq], solved, 0, 0.0)


def iter_threads(demo: ThreadDemo) -> Iterator[ThreadDemo]:
    yield demo
    for group in demo.children:
        for child in group:
            yield from iter_threads(child)
