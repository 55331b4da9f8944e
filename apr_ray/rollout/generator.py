"""The generator actor: one engine (vLLM `AsyncLLM`), many thread trees at once, versioned weights.

Owns the actor's configuration, the columnar batch in which problems come in (`problems_to_batch`), and
the weight update protocol. The work is in `GeneratorImpl`, a plain class tested without Ray; `Generator`
is its Ray actor. It must not import the learner or the trainer.

Concurrency: `run_trees` is async and the actor is async, so every call's trees share the engine's
continuous batching with every other call's; children of all trees batch together.

Weight updates never serve a half-updated model, and every tree is sampled from one version: an update
closes the gate to new trees, waits for the trees in flight to finish, reloads the weights in place
(`vllm_ext.WeightReloadExtension`), resets the prefix cache, records the version, and opens the gate.
Each tree records the version it ran with (`TreeRecord.policy_version`).

Tree records go out as a list of `types.TreeRecord`, pickled by Ray. That was measured against flat
numpy columns (token ids concatenated with offsets, float32 logprobs) and Arrow tables of the same
columns (bench/rollout.py --transport, bench/results.md): the columnar forms are ~25% smaller, but
building them on the actor and turning them back into records costs more than pickling the dataclasses,
whose token ids pickle at 3 bytes each for this vocabulary; the consumer needs the records either way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field

from apr_ray.countdown.problems import Problem
from apr_ray.countdown.protocol import get_protocol
from apr_ray.rollout.engines import Engine, SamplingConfig
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.rollout.engine_config import VllmEngineConfig
from apr_ray.types import TreeRecord


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: VllmEngineConfig
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="vLLM, or the transformers engine (no vLLM needed; slower)")
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
        self.last_drained = 0  # trees the last update waited for

    async def start(self) -> None:
        """Build the engine (if none was given) on this event loop; idempotent."""
        if self.runtime is not None:
            return
        if self.tokenizer is None:
            from apr_ray.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.cfg.engine.model)
        if self.engine is None and self.cfg.backend == "transformers":
            self.engine = _transformers_engine(self.cfg, self.tokenizer)
        if self.engine is None:
            from apr_ray.rollout.vllm_engine import VllmEngine

            self.engine = VllmEngine(self.cfg.engine, self.tokenizer.eos_token_id)
            limit = self.engine.max_model_len
            if self.cfg.runtime.context_window > limit:
                raise ValueError(f"runtime.context_window ({self.cfg.runtime.context_window}) exceeds the engine's "
                                 f"max_model_len ({limit}); lower it or raise engine.max_model_len")
        self.runtime = Runtime(self.engine, self.tokenizer, get_protocol(self.cfg.protocol), self.cfg.runtime)
        self._runtimes = {None: self.runtime}
        self._gate, self._idle = asyncio.Event(), asyncio.Event()
        self._gate.set()
        self._idle.set()
        self._slots = asyncio.Semaphore(self.cfg.max_concurrent_trees)
        self._update_lock = asyncio.Lock()

    def policy_version(self) -> int:
        return self.version

    def ping(self) -> str:
        """Liveness probe of RLlib's FaultTolerantActorManager (the pool)."""
        return "pong"

    def engine_dead(self) -> bool:
        return bool(getattr(self.engine, "dead", False))

    async def apply(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """How RLlib's FaultTolerantActorManager calls an actor: `func(self, ...)`, awaited when it is a
        coroutine. Unlike RLlib's own `FaultAwareApply.apply`, an application error is returned to the
        caller without ending the actor: the pool decides what to do about it."""
        out = func(self, *args, **kwargs)
        return await out if inspect.isawaitable(out) else out

    async def run_trees(self, batch: dict[str, Any], sampling: SamplingConfig | None = None) -> list[TreeRecord]:
        """Roll out every problem of a batch (`problems_to_batch` columns); tree records, in order.
        `sampling` replaces the configured sampling for this call (evaluation decodes greedily)."""
        await self.start()
        rows = _batch_rows(batch)
        runtime = self._runtime(sampling)
        return list(await asyncio.gather(*(self._tree(runtime, *row) for row in rows)))

    def _runtime(self, sampling: SamplingConfig | None) -> Runtime:
        key = None if sampling is None else sampling.model_dump_json()
        if key not in self._runtimes:
            cfg = self.cfg.runtime.model_copy(update={"sampling": sampling})
            self._runtimes[key] = Runtime(self.engine, self.tokenizer, get_protocol(self.cfg.protocol), cfg)
        return self._runtimes[key]

    async def _tree(self, runtime: Runtime, target: int, nums: list[int], problem_id: str, seed: int) -> TreeRecord:
        async with self._slots:
            await self._gate.wait()
            self._in_flight += 1
            self._idle.clear()
            try:
                tree = await runtime.run_tree(target, nums, problem_id=problem_id, seed=seed,
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
            self.last_drained = self._in_flight
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
        return {"policy_version": self.version, "trees_in_flight": self._in_flight, "trees_done": self.trees_done,
                "tokens_done": self.tokens_done, "last_reload_s": self.last_reload_s, "last_drained": self.last_drained}

    def shutdown(self) -> None:
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def _transformers_engine(cfg: GeneratorConfig, tokenizer: Any) -> Engine:
    import torch
    from transformers import AutoModelForCausalLM

    from apr_ray.rollout.transformers_engine import TransformersEngine

    model = AutoModelForCausalLM.from_pretrained(cfg.engine.model, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              max_batch_size=cfg.engine.max_num_seqs)


@ray.remote
class Generator(GeneratorImpl):
    """`GeneratorImpl` as an async Ray actor. Give it the CPUs vLLM should use (`num_cpus`): Ray sets the
    actor's OMP threads to that number (shared/notes/stack.md, pitfall 4)."""

    async def run_trees(self, batch: dict[str, Any], sampling: SamplingConfig | None = None) -> list[TreeRecord]:
        """As `GeneratorImpl.run_trees`; but an actor whose engine died ends itself instead of answering
        with trees that all ended in ERROR: the pool then sees a dead actor, serves its requests elsewhere
        and starts a replacement (a live actor with a dead engine would stay broken for the whole run)."""
        if self.engine_dead():
            ray.actor.exit_actor()
        trees = await super().run_trees(batch, sampling)
        if self.engine_dead():
            ray.actor.exit_actor()
        return trees
