"""The times that unit tests used to assert (and that made them flaky on a busy 2-core machine), measured
here instead: the ladder on 100,000-character hostile text, the tree viewer on a 291-thread tree, and the
runtime on an APR demonstration replayed through it. Each is a median of several repeats next to a
baseline measured in the same run (a plain pass over the same bytes), so the ratio survives a noisy machine.

    .venv/bin/python bench/unit_timings.py     # ~20 s on one core; prints a markdown table

Single process, no Ray, no model.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from datetime import date

from apr_ray.countdown import text as T
from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import AprProtocol
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.ladder import thread_ladder
from apr_ray.rollout.engines import ReplayEngine
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord, critical_path
from apr_ray.viz import render_tree_html

EOS = "</s>"


def median_s(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hostile_texts() -> list[tuple[str, str]]:
    rng = random.Random(7)
    alphabet = "0123456789[]:,'+-*/=#<> \nCurrent State: Exploring Operation: \x00\r\u00e9\U0001f600"
    garbage = "".join(rng.choice(alphabet) for _ in range(100_000))
    move = "Exploring Operation: 1+1=2, Resulting Numbers: [2]\n"
    return [(garbage, garbage), ("", "x" * 100_000), ("Current State: " * 20_000, "Current State: " * 20_000),
            ("", (move + T.NO_SOLUTION + "\n") * 100_000)]


def wide_tree() -> TreeRecord:
    """291 threads: a root with two segments of 12 children, each child with 10 grandchildren."""
    out = "Exploring Operation: 1+1=2, Resulting Numbers: [2]\n" * 8
    threads: list[ThreadRecord] = []

    def add(thread: int, parent: int, seg: int, depth: int, end: EndReason, spawned: list[int] = ()) -> None:
        ids = [ord(c) for c in out]
        i = len(threads)
        threads.append(ThreadRecord(request_id=i, thread_id=thread, parent_thread_id=parent, depth=depth, segment=seg,
                                    prompt_ids=[ord(c) for c in f"prompt {i}\n"], output_ids=ids,
                                    logprobs=[-0.5] * len(ids), end_reason=end, start_s=0.1 * i, end_s=0.1 * i + 0.05,
                                    spawned_thread_ids=list(spawned)))

    ids = iter(range(1, 10_000))
    for k in range(2):
        kids = [next(ids) for _ in range(12)]
        add(0, -1, k, 0, EndReason.SPAWN, kids)
        for kid in kids:
            grand = [next(ids) for _ in range(10)]
            add(kid, 0, 0, 1, EndReason.SPAWN, grand)
            for g in grand:
                add(g, kid, 0, 2, EndReason.EOS)
            add(kid, 0, 1, 1, EndReason.EOS)
    add(0, -1, 2, 0, EndReason.EOS)
    cp, _ = critical_path(threads)
    metrics = TreeMetrics(sum(len(r.output_ids) for r in threads), cp, 291, len(threads),
                          sum(bool(r.spawned_thread_ids) for r in threads), 100, 1.5)
    return TreeRecord(24, [1, 2, 3, 4], threads, metrics, "path\n", True, problem_id="p", policy_version=1)


def main() -> None:
    rows = []
    texts = hostile_texts()
    ladder = median_s(lambda: [thread_ladder(p, o, EOS) for p, o in texts])
    scan = median_s(lambda: [sum(c == "\n" for c in p + o) for p, o in texts])
    rows.append(("ladder: 4 hostile threads of 100k characters", ladder, "a Python pass over the same characters",
                 scan))

    tree = wide_tree()
    viewer = median_s(lambda: render_tree_html(tree, lambda ids: "".join(map(chr, ids))))
    decode = median_s(lambda: ["".join(map(chr, r.output_ids)) for r in tree.threads])
    rows.append(("viewer: a 291-thread tree to HTML", viewer, "decoding its threads' text", decode))

    tok = build_tokenizer()
    problem = Problem(24, (3, 7, 11, 5))
    demo = flatten_apr(problem, solve_apr(problem, SolverConfig(max_spawn_depth=2, apr_promising=1.0),
                                          random.Random(18)))
    unlimited = RuntimeConfig(max_children=64, max_tokens=1_000_000, context_window=1_000_000,
                              max_tree_tokens=100_000_000)
    runtime = Runtime(ReplayEngine.from_demos([demo], tok), tok, AprProtocol(), unlimited)
    replay = median_s(lambda: asyncio.run(runtime.run_tree(problem.target, list(problem.nums))))
    encode = median_s(lambda: [tok.encode(seq.prompt + seq.completion, add_special_tokens=False)
                               for seq in demo.sequences])
    rows.append((f"runtime: an APR demonstration ({len(demo.sequences)} requests) replayed", replay,
                 "tokenizing its requests", encode))

    print(f"## Former unit-test timings ({date.today()}, `bench/unit_timings.py`, median of 5)\n")
    print("| what | time | baseline | baseline time | ratio |")
    print("| --- | ---: | --- | ---: | ---: |")
    for what, t, base, tb in rows:
        print(f"| {what} | {t * 1e3:.1f} ms | {base} | {tb * 1e3:.1f} ms | {t / tb:.1f}x |")


if __name__ == "__main__":
    main()
