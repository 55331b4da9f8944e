"""Symbolic solvers that write demonstrations: SoS+ (serial hybrid DFS/BFS beam search) and APR (the same
search, spawning child threads where several candidates remain).

The search follows the APR reference (shared/research/apr.md §2): expand a node over all pairs and
moves, keep the `beam_size` best by the multiplicative heuristic, shuffle them, number the non-terminal
ones, then either dive into them (SoS+ "promising" sub searches), hand each to a child thread (APR
spawn), or queue them best-first. Departures from the reference, on purpose:
- ties in the priority queue break by insertion order (the reference compares nodes, effectively
  arbitrary); the trace format is unchanged;
- APR children may spawn their own children up to `max_spawn_depth` (the reference: one level);
- nodes are small tuples, never deep-copied, which makes generation several times faster.

Output of `solve_apr` is a `ThreadDemo` tree equal in shape to the reference's `trace_dict`
(`main_calls` = `segments`, `sub_calls` = `children`), so reference data and ours share one code path.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apr_ray.countdown import text as T
from apr_ray.countdown.problems import Problem, moves


class SolverConfig(BaseModel):
    """Search settings. Beam widths are drawn per problem, uniformly, as in the reference scripts."""

    model_config = ConfigDict(extra="forbid")

    sosp_max_beam: int = Field(5, ge=1, le=64, description="SoS+ beam ~ U{1..sosp_max_beam}")
    sosp_promising: float = Field(0.5, ge=0.0, le=1.0, description="SoS+ chance to dive into new nodes")
    apr_min_beam: int = Field(
        1, ge=1, le=64, description="APR parent beam ~ U{apr_min_beam..apr_max_beam} (reference: 1). Equal to "
        "apr_max_beam, every demonstration searches alike: a model can predict how many moves the root explores")
    apr_max_beam: int = Field(10, ge=1, le=64, description="APR parent beam ~ U{apr_min_beam..apr_max_beam}")
    apr_max_sub_beam: int = Field(15, ge=1, le=64, description="child beam ~ U{parent beam..apr_max_sub_beam}")
    apr_promising: float = Field(0.9, ge=0.0, le=1.0, description="APR chance to spawn where it may")
    max_spawn_depth: int = Field(1, ge=1, le=4, description="threads at depth < this may spawn (reference: 1)")
    apr_spawn_order: Literal["heuristic", "generated"] = Field(
        "heuristic",
        description="order of the children in a spawn block: heuristic (the reference: best first, a permutation "
        "of the generated nodes) or generated (#X,0, #X,1, ...: the order they were generated, which a small "
        "model learns to write without naming a node twice)",
    )
    expand_order: Literal["shuffled", "heuristic", "enumeration"] = Field(
        "shuffled",
        description="order of the kept candidates when a node is expanded: shuffled (the reference), heuristic "
        "(best first) or enumeration (pairs and moves in a fixed order: the same beam, written in an order a "
        "small model can follow without repeating or skipping a move)",
    )

    @model_validator(mode="after")
    def _beams(self) -> SolverConfig:
        if self.apr_min_beam > self.apr_max_beam:
            raise ValueError(f"apr_min_beam ({self.apr_min_beam}) > apr_max_beam ({self.apr_max_beam})")
        return self


@lru_cache(maxsize=64)
def _factors(target: int) -> tuple[int, ...]:
    return tuple(i for i in range(2, target + 1) if target % i == 0) or (1,)


@lru_cache(maxsize=1 << 16)
def _factor_distance(n: int, target: int) -> int:
    return min(abs(n - f) for f in _factors(target))


def mult_heuristic(nums: tuple[int, ...], target: int) -> int:
    """Sum over numbers of the distance to the nearest factor (>= 2) of the target (reference)."""
    return sum(_factor_distance(n, target) for n in nums)


@dataclass(slots=True)
class Node:
    nums: tuple[int, ...]
    ops: tuple[str, ...]
    heuristic: int
    parent: Node | None
    idx: str = ""
    nums_text: str = ""  # fmt_nums(nums), formatted once: it appears in up to four lines per node


def _children(node: Node, target: int, beam: int, order: str, rng: random.Random) -> list[Node]:
    """Expand over all pairs and moves, keep the `beam` best (stable sort), then put them in `order`
    (SolverConfig.expand_order; the reference shuffles).

    The heuristic is a sum over numbers, so a child's is its parent's minus the two operands' terms plus
    the result's; only the kept candidates become Nodes.
    """
    nums = node.nums
    candidates: list[tuple[int, int, int, int, str]] = []
    for i, j in itertools.combinations(range(len(nums)), 2):
        base = node.heuristic - _factor_distance(nums[i], target) - _factor_distance(nums[j], target)
        for value, op in moves(nums[i], nums[j]):
            candidates.append((base + _factor_distance(value, target), len(candidates), i, j, value, op))
    candidates.sort(key=lambda c: c[0])
    kept = candidates[:beam]
    if order == "enumeration":
        kept.sort(key=lambda c: c[1])
    out = []
    for h, _, i, j, value, op in kept:
        rest = tuple(nums[k] for k in range(len(nums)) if k != i and k != j)
        new = rest + (value,)
        out.append(Node(new, node.ops + (op,), h, node, "", T.fmt_nums(new)))
    if order == "shuffled":
        rng.shuffle(out)
    return out


def path_to_goal(goal: Node, start: Node, target: int) -> str:
    """The summary path from `start` to `goal` that follows a goal line (reference `get_path_to_target`)."""
    chain = [goal]
    while chain[-1] is not start:
        parent = chain[-1].parent
        if parent is None:
            raise ValueError("goal node does not descend from the start node")
        chain.append(parent)
    chain.reverse()
    parts: list[str] = []
    for node, nxt in zip(chain, chain[1:]):
        parts.append(T.moving_line(node.idx))
        parts.append(T.state_line(target, node.nums, node.ops))
        parts.append(T.exploring_line(nxt.ops[-1], nxt.nums))
        if nxt is goal:
            parts.append(T.goal_line(target))
        else:
            parts.append(T.generated_line(nxt.idx, target, nxt.nums, nxt.ops[-1]))
    return "".join(parts)


def _expand_into(out: list[str], node: Node, target: int, beam: int, order: str,
                 rng: random.Random) -> tuple[Node | None, list[Node]]:
    """Write one node's expansion lines; return (goal node if found, numbered non-terminal children)."""
    numbered: list[Node] = []
    for child in _children(node, target, beam, order, rng):
        child.idx = f"{node.idx},{len(numbered)}"
        op = child.ops[-1]
        # inlined T.exploring_line / T.generated_line with the pre-formatted numbers (hot loop)
        out.append(f"Exploring Operation: {op}, Resulting Numbers: {child.nums_text}\n")
        if len(child.nums) == 1:
            if child.nums[0] == target:
                out.append(T.goal_line(target))
                return child, numbered
            out.append(T.unequal_line(child.nums[0], target))
        else:
            out.append(f"Generated Node #{child.idx}: {target}:{child.nums_text} Operation: {op}\n")
            numbered.append(child)
    numbered.sort(key=lambda n: n.heuristic)
    return None, numbered


# --- SoS+ ---------------------------------------------------------------------------------------


def _sosp_search(out: list[str], start: Node, root: Node, target: int, beam: int, promising: float,
                 order: str, level: int, rng: random.Random) -> bool:
    counter = itertools.count()
    open_set = [(start.heuristic, next(counter), start)]
    while open_set:
        current = [heapq.heappop(open_set)[2] for _ in range(min(beam, len(open_set)))]
        for pos, node in enumerate(current):
            out.append(T.state_line(target, node.nums, node.ops))
            goal, numbered = _expand_into(out, node, target, beam, order, rng)
            if goal is not None:
                out.append(path_to_goal(goal, root, target))
                return True
            dive = rng.random() < promising
            for child in numbered:
                if dive:
                    out.append(f"Start Sub Search at level {level + 1}: Moving to Node #{child.idx}\n")
                    found = _sosp_search(out, child, root, target, beam, promising, order, level + 1, rng)
                    out.append(f"Exit Sub Search at level {level + 1}\n")
                    if found:
                        return True
                    out.append("No solution found in sub search\n")
                else:
                    heapq.heappush(open_set, (child.heuristic, next(counter), child))
            if pos < len(current) - 1:
                out.append(T.moving_line(current[pos + 1].idx))
        if open_set:
            out.append(T.moving_line(open_set[0][2].idx))
    out.append(T.NO_SOLUTION + "\n")
    return False


def sosp_prompt(problem: Problem) -> str:
    return T.state_line(problem.target, problem.nums, ())


def solve_sosp(problem: Problem, cfg: SolverConfig, rng: random.Random) -> tuple[str, bool]:
    """A serial SoS+ trace (prompt line included) and whether it reached the goal."""
    beam = rng.randint(1, cfg.sosp_max_beam)
    root = Node(tuple(problem.nums), (), mult_heuristic(tuple(problem.nums), problem.target), None, "0")
    out: list[str] = []
    found = _sosp_search(out, root, root, problem.target, beam, cfg.sosp_promising, cfg.expand_order, 0, rng)
    return "".join(out), found


# --- APR ----------------------------------------------------------------------------------------


@dataclass
class ThreadDemo:
    """One thread of a parallel demonstration (the reference's trace_dict).

    `segments[k]` is the thread's whole text after its k-th join: segment 0 starts with the thread's
    prompt, segment k+1 repeats segment k's text before its spawn block, then the join block, then the
    continuation. `children[k]` are the threads spawned at the end of segment k.
    """

    segments: list[str]
    children: list[list[ThreadDemo]] = field(default_factory=list)
    solved: bool = False


def _apr_search(start: Node, target: int, beam: int, sub_beam: int, cfg: SolverConfig, depth: int,
                rng: random.Random) -> tuple[ThreadDemo, Node | None]:
    demo = ThreadDemo(segments=[])
    out: list[str] = [T.moving_line(start.idx)]
    counter = itertools.count()
    open_set = [(start.heuristic, next(counter), start)]
    while open_set:
        current = [heapq.heappop(open_set)[2] for _ in range(min(beam, len(open_set)))]
        for pos, node in enumerate(current):
            out.append(T.state_line(target, node.nums, node.ops))
            goal, numbered = _expand_into(out, node, target, beam, cfg.expand_order, rng)
            if goal is not None:
                out.append(path_to_goal(goal, start, target))
                demo.segments.append("".join(out))
                demo.solved = True
                return demo, goal
            if depth < cfg.max_spawn_depth and len(numbered) > 1 and rng.random() < cfg.apr_promising:
                if cfg.apr_spawn_order == "generated":
                    numbered = sorted(numbered, key=lambda c: int(c.idx.rsplit(",", 1)[1]))
                results = [
                    _apr_search(child, target, sub_beam, sub_beam, cfg, depth + 1, rng) for child in numbered
                ]
                demo.children.append([r[0] for r in results])
                before = "".join(out)
                spawn = [T.SPAWN_OPEN + "\n"]
                spawn += [T.spawn_child_line(i, depth + 1, c.idx) for i, c in enumerate(numbered)]
                spawn.append(T.SPAWN_CLOSE + "\n")
                demo.segments.append(before + "".join(spawn))
                out = [before, T.JOIN_OPEN + "\n"]
                for i, (child, (_, child_goal)) in enumerate(zip(numbered, results)):
                    if child_goal is not None:
                        out.append(T.join_goal_line(i, depth + 1, child.idx))
                        out.append(path_to_goal(child_goal, child, target))
                    else:
                        out.append(T.join_no_solution_line(i, depth + 1, child.idx))
                out.append(T.JOIN_CLOSE + "\n")
                for _, child_goal in results:
                    if child_goal is not None:
                        out.append(T.goal_line(target))
                        out.append(path_to_goal(child_goal, start, target))
                        demo.segments.append("".join(out))
                        demo.solved = True
                        return demo, child_goal
            else:
                for child in numbered:
                    heapq.heappush(open_set, (child.heuristic, next(counter), child))
            if pos < len(current) - 1:
                out.append(T.moving_line(current[pos + 1].idx))
        if open_set:
            out.append(T.moving_line(open_set[0][2].idx))
    out.append(T.NO_SOLUTION + "\n")
    demo.segments.append("".join(out))
    return demo, None


def solve_apr(problem: Problem, cfg: SolverConfig, rng: random.Random) -> ThreadDemo:
    """A parallel APR demonstration for one problem."""
    beam = rng.randint(cfg.apr_min_beam, cfg.apr_max_beam)
    sub_beam = rng.randint(min(beam, cfg.apr_max_sub_beam), cfg.apr_max_sub_beam)
    nums = tuple(problem.nums)
    root = Node(nums, (), mult_heuristic(nums, problem.target), None, "0")
    demo, _ = _apr_search(root, problem.target, beam, sub_beam, cfg, 0, rng)
    return demo
