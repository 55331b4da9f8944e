"""Transformers engine benchmark: continuous batching (`apr_ray.rollout.transformers_engine.TransformersEngine`)
against the static-batching engine it replaced (copied below as `StaticBatchEngine`), same process, same
model, same prompts, greedy.

Model: a preset from `apr_ray.modeling` with random weights. Requests end at EOS or at their own
max_new_tokens, drawn uniformly from [--min-new, --max-new], so rows of a batch end at very different steps
(a random model rarely emits EOS, so the limits decide). Two workloads:
- burst: --rows requests sent at once (one batch for the old engine: every row runs until the longest ends);
- chains: --chains chains of --depth requests, each sent when the one before it returns (how a thread
  tree's children arrive while the batch that holds their parent still runs).
Reported per workload and engine: generated tokens, wall seconds, tokens/s, the ratio new / old, and
whether every greedy output of the new engine equals the old one's (they must: both equal
`model.generate` on each prompt alone, up to float rounding in near-ties).

Usage: python bench/transformers_engine.py [--preset tiny] [--device cpu] [--rows 48] [--chains 12]
       [--depth 3] [--min-new 16] [--max-new 512] [--threads 1] [--append] [--profile]
--append adds the tables to bench/results.md with the date and the machine; --profile runs only the new
engine and prints a cProfile of its decoding thread. Otherwise the last line printed is the
`BENCH_SUMMARY` line of bench/all.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from apr_ray.modeling import get_preset, init_model
from apr_ray.rollout.engines import Engine, GenerationResult, SamplingConfig
from apr_ray.rollout.transformers_engine import TransformersEngine as ContinuousEngine
from apr_ray.tokenizer import build_tokenizer

RESULTS = Path(__file__).with_name("results.md")
GREEDY = SamplingConfig(temperature=0.0)


# --- the engine before continuous batching (baseline; as it was in apr_ray/rollout/engines.py) ----------


@dataclass
class _Pending:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    ignore_eos: bool
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)


class StaticBatchEngine(Engine):
    """Static batching: requests that arrive while a batch runs wait for the next batch; DynamicCache
    (concatenated every step), the mask grown with torch.cat, one host sync per step and per sampled row."""

    def __init__(self, model: Any, *, eos_token_id: int, pad_token_id: int = 0, max_batch_size: int = 64,
                 max_wait_s: float = 0.002):
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        pending = _Pending(list(prompt_ids), max_new_tokens, sampling, ignore_eos,
                           asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled.set()
            raise

    async def _serve(self) -> None:
        while self._pending:
            await asyncio.sleep(self.max_wait_s)
            batch = [p for p in self._pending[: self.max_batch_size] if not p.cancelled.is_set()]
            del self._pending[: self.max_batch_size]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self._decode_batch, batch)
            except Exception as err:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    def _decode_batch(self, batch: list[_Pending]) -> list[GenerationResult]:
        device = next(self.model.parameters()).device
        rows, width = len(batch), max(len(p.prompt_ids) for p in batch)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(batch):
            input_ids[i, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            mask[i, width - len(p.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [None if p.sampling.seed is None else torch.Generator(device=device).manual_seed(p.sampling.seed)
                      for p in batch]
        outputs: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        finish = ["length"] * rows
        done = [False] * rows
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            next_pos = positions[:, -1:] + 1
            for _ in range(max(p.max_new_tokens for p in batch)):
                logits = out.logits[:, -1, :].float()
                tokens = _static_sample(logits, batch, generators)
                raw = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
                token_list, raw_list = tokens.tolist(), raw.tolist()
                for i, p in enumerate(batch):
                    if done[i]:
                        continue
                    outputs[i].append(token_list[i])
                    logprobs[i].append(raw_list[i])
                    if token_list[i] == self.eos_token_id and not p.ignore_eos:
                        done[i], finish[i] = True, "eos"
                    elif len(outputs[i]) >= p.max_new_tokens or p.cancelled.is_set():
                        done[i] = True
                if all(done):
                    break
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                out = self.model(input_ids=tokens.unsqueeze(1).to(device), attention_mask=mask,
                                 position_ids=next_pos, past_key_values=out.past_key_values, use_cache=True)
                next_pos = next_pos + 1
        return [GenerationResult(o, lp, f) for o, lp, f in zip(outputs, logprobs, finish)]


def _static_sample(logits: Any, batch: list[_Pending], generators: list[Any]) -> Any:
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(batch):
        s = p.sampling
        if s.temperature == 0.0:
            continue
        row = logits[i] / s.temperature
        if 0 < s.top_k < row.numel():
            kth = torch.topk(row, s.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
            probs = probs.scatter(0, order[drop], 0.0)
            probs = probs / probs.sum()
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    return tokens


# --- workloads ------------------------------------------------------------------------------------------


def make_requests(n: int, args: argparse.Namespace, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_new_tokens): prompts of 16..64 random non-special ids after BOS."""
    rng = random.Random(seed)
    return [([1, *(rng.randrange(4, vocab) for _ in range(rng.randint(16, 64)))],
             rng.randint(args.min_new, args.max_new)) for _ in range(n)]


async def burst(engine: Engine, requests: list[tuple[list[int], int]]) -> list[GenerationResult]:
    return list(await asyncio.gather(*(engine.generate(p, m, GREEDY) for p, m in requests)))


async def chains(engine: Engine, groups: list[list[tuple[list[int], int]]]) -> list[GenerationResult]:
    async def chain(group):
        return [await engine.generate(p, m, GREEDY) for p, m in group]

    return [r for results in await asyncio.gather(*(chain(g) for g in groups)) for r in results]


def timed(engine: Engine, workload: Any, data: Any, device: torch.device) -> tuple[list[GenerationResult], float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = asyncio.run(workload(engine, data))
    return results, time.perf_counter() - start


def profile(engine: ContinuousEngine, data: dict, names: list[str], device: torch.device) -> None:
    """cProfile of the decoding thread (host time: in a launch-bound regime, what a step costs)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    decode_loop = engine._decode_loop

    def profiled() -> None:
        profiler.enable()
        try:
            decode_loop()
        finally:
            profiler.disable()

    engine._decode_loop = profiled
    for name in names:
        workload, requests = data[name]
        steps = engine.decode_steps
        results, wall = timed(engine, workload, requests, device)
        tokens = sum(len(r.output_ids) for r in results)
        print(f"{name}: {tokens} tokens, {wall:.2f} s, {engine.decode_steps - steps} decode steps, "
              f"{wall / max(1, engine.decode_steps - steps) * 1000:.2f} ms per step")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def machine() -> str:
    import transformers
    from learner import machine as base_machine  # bench/ is on sys.path when run as a script

    return f"{base_machine()}, transformers {transformers.__version__}; torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=48, help="burst: requests sent at once")
    parser.add_argument("--chains", type=int, default=12, help="chains: how many run at once")
    parser.add_argument("--depth", type=int, default=3, help="chains: requests per chain, one after another")
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--workloads", default="burst,chains")
    parser.add_argument("--append", action="store_true", help="append the tables to bench/results.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on a CPU device: with 2 OpenMP threads per op, a decoding thread on a "
                        "busy 2-core machine was seen to stall up to 100x on tiny matmuls (either engine, at random)")
    parser.add_argument("--profile", action="store_true",
                        help="run only the new engine and print where its decoding thread spends its time")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    cfg = get_preset(args.preset)
    cfg = cfg.model_copy(update={"max_position_embeddings": max(cfg.max_position_embeddings, args.max_new + 128)})
    model = init_model(cfg, tok).to(device)
    params = sum(p.numel() for p in model.parameters())
    vocab = len(tok)
    engines = {
        "static (old)": lambda: StaticBatchEngine(model, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id, max_batch_size=args.max_batch_size),
        "continuous (new)": lambda: ContinuousEngine(model, eos_token_id=tok.eos_token_id,
                                                     pad_token_id=tok.pad_token_id,
                                                     max_batch_size=args.max_batch_size),
    }
    for make in engines.values():  # warm-up: kernels, allocator, lazy imports
        asyncio.run(burst(make(), make_requests(4, argparse.Namespace(min_new=8, max_new=16), vocab, seed=99)))

    data = {
        "burst": (burst, make_requests(args.rows, args, vocab, seed=0)),
        "chains": (chains, [make_requests(args.depth, args, vocab, seed=100 + c) for c in range(args.chains)]),
    }
    lines = [
        "| workload | requests | engine | tokens | wall s | tokens/s | new / old | outputs equal |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    if args.profile:
        profile(engines["continuous (new)"](), data, args.workloads.split(","), device)
        return
    summary: dict[str, float] = {}  # bench/all.py's figures, per workload
    for name in args.workloads.split(","):
        workload, requests = data[name]
        count = len(requests) if name == "burst" else args.chains * args.depth
        rates, outputs = {}, {}
        for label, make in engines.items():
            engine = make()
            results, wall = timed(engine, workload, requests, device)
            tokens = sum(len(r.output_ids) for r in results)
            rates[label], outputs[label] = tokens / wall, [r.output_ids for r in results]
            ratio = f"{rates[label] / rates['static (old)']:.2f}" if label != "static (old)" else ""
            same = ""
            if label != "static (old)":
                equal = sum(a == b for a, b in zip(outputs[label], outputs["static (old)"]))
                same = f"{equal}/{len(results)}"
            lines.append(f"| {name} | {count} | {label} | {tokens:,} | {wall:.2f} | {rates[label]:,.0f} | "
                         f"{ratio} | {same} |")
            print(lines[-1], file=sys.stderr, flush=True)
        new, old = rates["continuous (new)"], rates["static (old)"]
        equal = sum(a == b for a, b in zip(outputs["continuous (new)"], outputs["static (old)"]))
        summary |= {f"{name}_requests": count, f"{name}_new_tok_s": new, f"{name}_old_tok_s": old,
                    f"{name}_new_over_old": new / old, f"{name}_outputs_equal": equal / count}

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        f"## Transformers engine: continuous vs static batching (bench/transformers_engine.py), {when}",
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end.",
        f"Model: preset {args.preset}, {params / 1e6:.1f}M parameters, random weights, {cfg.dtype}, on {args.device}. "
        f"Greedy; max_new_tokens uniform in [{args.min_new}, {args.max_new}]; prompts 16-64 tokens; "
        f"burst {args.rows} requests at once; chains {args.chains} x {args.depth} requests one after another; "
        f"max_batch_size {args.max_batch_size}.",
        "",
        *lines,
        "",
    ])
    print(section)
    if args.append:
        with RESULTS.open("a") as f:
            f.write("\n" + section)
    print("BENCH_SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
