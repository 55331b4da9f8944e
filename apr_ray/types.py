"""What crosses process boundaries: thread / tree records produced by rollouts, sequences consumed by training.

This is the one contract between generation and training. Pure Python (no torch, no Ray) so that
every layer can import it. Token ids travel with their masks: a sequence's prompt is never trained,
its output (the tokens the sampler chose) is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EndReason(str, Enum):
    """Why one engine request (a thread segment) stopped."""

    EOS = "eos"  # the model ended its request with no spawn block: a finished thread
    SPAWN = "spawn"  # the model ended its request with a well-formed spawn block
    MAX_TOKENS = "max_tokens"  # tokens-per-thread limit
    CONTEXT = "context"  # prompt + output reached the per-thread context window
    TREE_TOKENS = "tree_tokens"  # total-tokens-per-tree budget exhausted
    TIMEOUT = "timeout"  # wall-clock limit per tree
    MALFORMED = "malformed"  # the output could not be parsed (e.g. a broken spawn block)
    DEPTH = "depth"  # a spawn at the maximum nesting depth
    ERROR = "error"  # the engine failed on this request


@dataclass
class ThreadRecord:
    """One engine request: a thread's first segment, or its continuation after a join."""

    request_id: int  # index of this record in TreeRecord.threads
    thread_id: int  # logical thread; the root is 0
    parent_thread_id: int  # -1 for the root
    depth: int  # 0 for the root, 1 for its children, ...
    segment: int  # 0 for a thread's first request, k after its k-th join
    prompt_ids: list[int]  # everything the engine was given (prompt, or pre-spawn text + join block)
    output_ids: list[int]  # tokens the sampler chose (trained)
    logprobs: list[float]  # sampler logprob of each output id; len == len(output_ids)
    end_reason: EndReason
    start_s: float = 0.0  # seconds since the tree started
    end_s: float = 0.0
    spawned_thread_ids: list[int] = field(default_factory=list)  # children spawned by this segment
    detail: str = ""  # human-readable note for non-EOS endings (what was malformed, which limit)


@dataclass
class TreeMetrics:
    tokens_total: int  # generated tokens over all threads
    tokens_critical_path: int  # longest causal chain of generated tokens
    num_threads: int  # logical threads (root + children)
    num_requests: int  # engine requests (segments)
    num_spawns: int
    max_context: int  # longest prompt + output of any request
    wall_s: float


@dataclass
class TreeRecord:
    """Everything one rollout of one problem produced."""

    target: int
    nums: list[int]
    threads: list[ThreadRecord]
    metrics: TreeMetrics
    final_answer: str | None  # the root's solution path, None when it reached no goal
    correct: bool  # final_answer passes the strict checker
    check_reason: str = ""  # why the checker rejected it
    policy_version: int = 0  # weights version the tree was sampled with
    problem_id: str = ""


@dataclass
class TrainSequence:
    """One thread segment as the learner sees it: loss only on output_ids.

    `weight` carries the per-tree normalisation (1 / sequences of its tree) so that every tree counts
    equally whatever its thread count; SFT sequences use weight 1.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    advantage: float = 0.0
    weight: float = 1.0
    sampler_logprobs: list[float] | None = None  # None for SFT demonstrations
    tree_index: int = -1  # which tree (within a batch) this sequence came from


def tree_to_dict(tree: TreeRecord) -> dict:
    """A JSON-ready dict (enums as their values)."""
    from dataclasses import asdict

    out = asdict(tree)
    for thread in out["threads"]:
        thread["end_reason"] = EndReason(thread["end_reason"]).value
    return out


def tree_from_dict(obj: dict) -> TreeRecord:
    """Inverse of tree_to_dict; raises KeyError/TypeError/ValueError naming what is missing or wrong."""
    threads = [ThreadRecord(**{**t, "end_reason": EndReason(t["end_reason"])}) for t in obj["threads"]]
    fields = {k: v for k, v in obj.items() if k not in ("threads", "metrics")}
    return TreeRecord(threads=threads, metrics=TreeMetrics(**obj["metrics"]), **fields)


def critical_path(threads: list[ThreadRecord]) -> tuple[int, list[int]]:
    """Longest causal chain of generated tokens: (its length, the request ids on it).

    A thread's chain is its segments' output tokens plus, for each spawn, the longest chain among the
    children it waited for (ThreadWeaver's L_cp; APR's "sequential tokens").
    """
    by_thread: dict[int, list[ThreadRecord]] = {}
    for rec in threads:
        by_thread.setdefault(rec.thread_id, []).append(rec)
    for segs in by_thread.values():
        segs.sort(key=lambda r: r.segment)

    def chain(thread_id: int, depth_guard: int) -> tuple[int, list[int]]:
        if depth_guard > 64:  # records are ours, but a corrupted file must not recurse forever
            raise ValueError("thread records nest deeper than 64 levels")
        length, path = 0, []
        for seg in by_thread.get(thread_id, []):
            length += len(seg.output_ids)
            path.append(seg.request_id)
            kids = [chain(c, depth_guard + 1) for c in seg.spawned_thread_ids if c in by_thread]
            if kids:
                best = max(kids, key=lambda k: k[0])
                length += best[0]
                path += best[1]
        return length, path

    roots = [t for t, segs in by_thread.items() if segs[0].parent_thread_id == -1]
    return chain(roots[0], 0) if roots else (0, [])
