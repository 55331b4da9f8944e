"""The generator actor: one engine (vLLM `AsyncLLM`), many thread trees at once, versioned weights.

Owns the actor's configuration, the compact columnar form in which problems come in and tree records go
out (`problems_to_batch`, `pack_trees` / `unpack_trees`), and the weight update protocol. The work is in
`GeneratorImpl`, a plain class tested without Ray; `Generator` is its Ray actor. It must not import the
learner or the trainer.

Concurrency: `run_trees` is async and the actor is async, so every call's trees share the engine's
continuous batching with every other call's; children of all trees batch together.

Weight updates never serve a half-updated model, and every tree is sampled from one version: an update
closes the gate to new trees, waits for the trees in flight to finish, reloads the weights in place
(`vllm_ext.WeightReloadExtension`), resets the prefix cache, records the version, and opens the gate.
Each tree records the version it ran with (`TreeRecord.policy_version`).

Why numpy columns: crossing Ray, a batch of trees as a dict of flat numpy arrays (token ids, logprobs
and per-record fields concatenated, with offsets) moves as a few out-of-band buffers instead of
millions of pickled Python ints; bench/rollout.py --transport measures it against pickled dataclasses and
Arrow (bench/results.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field

from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import get_protocol
from apr_ray.rollout.engines import Engine
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.rollout.vllm_engine import VllmEngineConfig
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord

END_REASONS = list(EndReason)  # code i <-> END_REASONS[i] in packed records
_METRICS = ("tokens_total", "tokens_critical_path", "num_threads", "num_requests", "num_spawns", "max_context")


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: VllmEngineConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    protocol: Literal["apr", "sosp"] = Field("apr", description="thread protocol of the rollouts")
    max_concurrent_trees: int = Field(512, ge=1, description="trees in flight at once on this actor")
    initial_version: int = Field(0, ge=0, description="policy version of the weights the engine starts with")


# --- compact batches ----------------------------------------------------------------------------


def problems_to_batch(problems: Sequence[Problem], seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Problems as columns: target [B], nums [B, K] (K = the most operands; shorter rows are padded
    with -1), problem_id [B] (str), seed [B] (tree seeds; default 0..B-1)."""
    width = max((len(p.nums) for p in problems), default=0)
    nums = np.full((len(problems), width), -1, dtype=np.int64)
    for i, p in enumerate(problems):
        nums[i, : len(p.nums)] = p.nums
    return {
        "target": np.array([p.target for p in problems], dtype=np.int64),
        "nums": nums,
        "problem_id": np.array([p.problem_id for p in problems], dtype=object),
        "seed": np.asarray(seeds if seeds is not None else range(len(problems)), dtype=np.int64),
    }


def _batch_rows(batch: dict[str, Any]) -> list[tuple[int, list[int], str, int]]:
    for key in ("target", "nums"):
        if key not in batch:
            raise KeyError(f"problem batch has no {key!r} column (columns: {sorted(batch)})")
    targets, nums = np.asarray(batch["target"]), batch["nums"]
    size = len(targets)
    ids = batch.get("problem_id", [""] * size)
    seeds = batch.get("seed", range(size))
    if not (len(nums) == len(ids) == len(seeds) == size):
        raise ValueError(f"problem batch columns differ in length: target {size}, nums {len(nums)}, "
                         f"problem_id {len(ids)}, seed {len(seeds)}")
    return [(int(targets[i]), [int(n) for n in nums[i] if n >= 0], str(ids[i]), int(seeds[i])) for i in range(size)]


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def pack_trees(trees: Sequence[TreeRecord]) -> dict[str, Any]:
    """Tree records as flat columns (see the module docstring); `unpack_trees` inverts it exactly.

    Logprobs travel as float32: every engine computes them in float32, so nothing is lost.
    """
    recs = [r for t in trees for r in t.threads]
    out: dict[str, Any] = {
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
        "prompt_ids": np.fromiter((i for r in recs for i in r.prompt_ids), dtype=np.int32),
        "output_offsets": _offsets([len(r.output_ids) for r in recs]),
        "output_ids": np.fromiter((i for r in recs for i in r.output_ids), dtype=np.int32),
        "logprobs": np.fromiter((x for r in recs for x in r.logprobs), dtype=np.float32),
    }
    for name in _METRICS:
        out[name] = np.array([getattr(t.metrics, name) for t in trees], dtype=np.int64)
    return out


def unpack_trees(packed: dict[str, Any]) -> list[TreeRecord]:
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


# --- the actor ----------------------------------------------------------------------------------


class GeneratorImpl:
    """The generator's work, without Ray. `engine` / `tokenizer` may be given (tests); otherwise `start`
    builds the vLLM engine and loads the tokenizer from the model directory."""

    def __init__(self, cfg: GeneratorConfig | dict, engine: Engine | None = None, tokenizer: Any = None):
        self.cfg = cfg if isinstance(cfg, GeneratorConfig) else GeneratorConfig.model_validate(cfg)
        self.engine, self.tokenizer = engine, tokenizer
        self.runtime: Runtime | None = None
        self.version = self.cfg.initial_version
        self._in_flight = 0
        self._gate: asyncio.Event | None = None  # set = new trees may start
        self._idle: asyncio.Event | None = None  # set = no tree in flight
        self._slots: asyncio.Semaphore | None = None
        self._update_lock: asyncio.Lock | None = None
        self.trees_done = 0
        self.tokens_done = 0
        self.last_reload_s = 0.0

    async def start(self) -> None:
        """Build the engine (if none was given) on this event loop; idempotent."""
        if self.runtime is not None:
            return
        if self.tokenizer is None:
            from apr_ray.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.cfg.engine.model)
        if self.engine is None:
            from apr_ray.rollout.vllm_engine import VllmEngine

            self.engine = VllmEngine(self.cfg.engine, self.tokenizer.eos_token_id)
            limit = self.engine.max_model_len
            if self.cfg.runtime.context_window > limit:
                raise ValueError(f"runtime.context_window ({self.cfg.runtime.context_window}) exceeds the engine's "
                                 f"max_model_len ({limit}); lower it or raise engine.max_model_len")
        self.runtime = Runtime(self.engine, self.tokenizer, get_protocol(self.cfg.protocol), self.cfg.runtime)
        self._gate, self._idle = asyncio.Event(), asyncio.Event()
        self._gate.set()
        self._idle.set()
        self._slots = asyncio.Semaphore(self.cfg.max_concurrent_trees)
        self._update_lock = asyncio.Lock()

    def policy_version(self) -> int:
        return self.version

    async def run_trees(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Roll out every problem of a batch (`problems_to_batch` columns); packed tree records, in order."""
        await self.start()
        rows = _batch_rows(batch)
        trees = await asyncio.gather(*(self._tree(*row) for row in rows))
        return pack_trees(trees)

    async def _tree(self, target: int, nums: list[int], problem_id: str, seed: int) -> TreeRecord:
        async with self._slots:
            await self._gate.wait()
            self._in_flight += 1
            self._idle.clear()
            try:
                tree = await self.runtime.run_tree(target, nums, problem_id=problem_id, seed=seed,
                                                   policy_version=self.version)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        self.trees_done += 1
        self.tokens_done += tree.metrics.tokens_total
        return tree

    async def update_weights(self, handle: Any) -> int:
        """Load a `weight_sync.WeightHandle` published by the learner; the version now served."""
        from apr_ray.weight_sync import from_wire

        if handle.version <= self.version:
            return self.version
        return await self.load_weights(from_wire(await handle.ref), handle.version)

    async def load_weights(self, named_tensors: Sequence[tuple[str, Any]], version: int) -> int:
        """Serve `version`: close the gate, drain the trees in flight, reload, reopen. Versions not newer
        than the one served are ignored (a late update never rolls the weights back)."""
        await self.start()
        async with self._update_lock:
            if version <= self.version:
                return self.version
            self._gate.clear()
            try:
                await self._idle.wait()
                start = time.perf_counter()
                await self.engine.reload_weights(named_tensors, version)
                self.last_reload_s = time.perf_counter() - start
                self.version = version
            finally:
                self._gate.set()
        return self.version

    def stats(self) -> dict[str, float]:
        return {"policy_version": self.version, "trees_in_flight": self._in_flight,
                "trees_done": self.trees_done, "tokens_done": self.tokens_done, "last_reload_s": self.last_reload_s}

    def shutdown(self) -> None:
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


@ray.remote
class Generator(GeneratorImpl):
    """`GeneratorImpl` as an async Ray actor. Give it the CPUs vLLM should use (`num_cpus`): Ray sets the
    actor's OMP threads to that number (shared/notes/stack.md, pitfall 4)."""
