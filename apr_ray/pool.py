"""The generator pool: generator actors behind RLlib's `FaultTolerantActorManager`, sized within a range.

Owns who serves which request, and what happens when an actor dies:
- a rollout is cut into requests of `groups_per_request` problems (each problem with its group of seeds);
  every actor holds up to `requests_per_worker` requests at once, and each request's trees run
  concurrently on its actor;
- the manager reports an actor that died (a `RayActorError` on any of its calls); every request that
  actor held is queued again, the actor is removed and killed, and a new one is started, loaded with the
  current weights and only then added (so it never serves stale weights);
- a request that raises on a live actor (an application error) comes back as a value, not as an error:
  the manager takes every error for a death (it marks the actor unhealthy and forgets the actor's other
  requests in flight), so an application error would cost a healthy actor and lose its other requests.
  Such a request is tried again, up to `MAX_REQUEST_ATTEMPTS` times, on the same actor or another;
- results are kept per request id, first arrival wins: a request served twice (its actor died after
  answering) is counted once, and a request lost with its actor is served again, so every problem of a
  rollout comes back exactly once;
- `resize(n)` grows or shrinks the pool within [min_workers, max_workers] between rollouts;
- a new actor the cluster has no room for (another job holds the CPUs) is given up after
  `placement_timeout_s` and the pool goes on smaller, down to `min_workers`; below that the run fails with
  a `PoolError` that names the resources each actor takes and what the cluster has free;
- with `follow_cluster`, `follow_cluster()` (between GRPO steps) sizes the pool to the units of
  `worker_resource` that the cluster's live nodes offer: a node that joins gets actors (loaded with the
  current weights before they serve), and a dead actor whose node left is not replaced when no capacity
  remains for it: the pool shrinks and the step completes on the others. `request_capacity(share)` asks
  an autoscaler for one more unit when rollout dominates the step, and withdraws the request when not.

The generator's work is `rollout.generator.GeneratorImpl`; this module adds scheduling only.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from apr_ray.config import PoolConfig
from apr_ray.countdown.problems import Problem
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.generator import Generator, GeneratorConfig, problems_to_batch
from apr_ray.types import TreeRecord
from apr_ray.weight_sync import WeightHandle

log = logging.getLogger(__name__)

# Application errors (not actor deaths) a request may raise before the rollout gives up on it.
MAX_REQUEST_ATTEMPTS = 3


class PoolError(RuntimeError):
    """The pool cannot finish a rollout (too many actor deaths, or a request that keeps failing)."""


@dataclass(frozen=True)
class _Failed:
    """What a request that raised on its actor returns in place of its trees."""

    error: str  # "Type: message"
    traceback: str


async def _run_trees(generator: Any, batch: dict[str, Any], sampling: SamplingConfig | None) -> Any:
    """`run_trees` on the actor (through the manager's `apply`), an application error as a `_Failed` value."""
    try:
        return await generator.run_trees(batch, sampling)
    except ray.exceptions.AsyncioActorExit:  # the actor ends itself (its engine died): a death, not a value
        raise
    except Exception as err:
        return _Failed(f"{type(err).__name__}: {err}", traceback.format_exc())


@dataclass
class _Request:
    request_id: int
    groups: list[int]  # positions of the rollout's problems in this request
    batch: dict[str, Any]
    attempts: int = 0


@dataclass
class RolloutStats:
    """What one `rollout` call took."""

    wall_s: float = 0.0
    requests: int = 0
    redispatched: int = 0  # requests queued again after their actor died or failed
    replaced: int = 0  # actors replaced during the call
    lost: int = 0  # actors that died and were not replaced (their node left the cluster)
    duplicates_dropped: int = 0  # results of a request already answered
    per_actor_trees: dict[int, int] = field(default_factory=dict)


class GeneratorPool:
    def __init__(self, gen_cfg: GeneratorConfig, pool_cfg: PoolConfig, weights: WeightHandle | None = None) -> None:
        from ray.rllib.utils.actor_manager import FaultTolerantActorManager

        self.gen_cfg = gen_cfg
        self.cfg = pool_cfg
        self.weights = weights  # what every actor serves; a new actor loads it before its first request
        self.manager = FaultTolerantActorManager(max_remote_requests_in_flight_per_actor=pool_cfg.requests_per_worker)
        self.restarts = 0
        self._ids = itertools.count()
        self._requested = 0  # worker_resource units asked of the autoscaler (request_capacity)
        self.resize(pool_cfg.num_workers)

    # ------------------------------------------------------------------ membership

    @property
    def size(self) -> int:
        return self.manager.num_actors()

    @property
    def version(self) -> int:
        return self.weights.version if self.weights is not None else self.gen_cfg.initial_version

    def _start_actors(self, count: int, required: int) -> list[Any]:
        """Up to `count` new generators with their engines up and the current weights loaded. They start side
        by side: an engine takes seconds (transformers) to minutes (vLLM) to come up. Those the cluster has no
        room for within `placement_timeout_s` are given up (other jobs may hold its CPUs: waiting on would hang
        the run without a word); fewer than `required` placed is a `PoolError`."""
        options: dict[str, Any] = {}
        if self.cfg.threads_per_worker:
            # Ray would set OMP_NUM_THREADS to num_cpus; vLLM's CPU backend binds its OMP threads itself and,
            # left to choose, keeps one core of the node for its scheduler process (on 2 cores: 1 thread).
            n = self.cfg.threads_per_worker
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(n),
                                                   "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}"}}
        if self.cfg.worker_resource:
            options["resources"] = {self.cfg.worker_resource: 1}
        actors = [
            Generator.options(
                **options,
                num_cpus=self.cfg.cpus_per_worker,
                num_gpus=self.cfg.gpus_per_worker,
                max_concurrency=max(64, 4 * self.cfg.requests_per_worker),
            ).remote(self.gen_cfg)
            for _ in range(count)
        ]
        try:
            placed = self._placed(actors)
            for actor in actors:
                if actor not in placed:
                    ray.kill(actor)
            if len(placed) < required:
                raise PoolError(self._no_room(len(placed), count, required))
            if len(placed) < count:
                log.warning("generator pool: the cluster had room for %d of %d new generators within "
                            "rollout.pool.placement_timeout_s = %.0f s; going on with %d (%s)", len(placed), count,
                            self.cfg.placement_timeout_s, self.size + len(placed), self._free_resources())
            actors = placed
            ray.get([actor.start.remote() for actor in actors])
            if self.weights is not None:
                ray.get([actor.update_weights.remote(self.weights) for actor in actors])
        except BaseException:  # none of them joins the pool, so none may outlive this call
            for actor in actors:
                ray.kill(actor)
            raise
        return actors

    def _placed(self, actors: list[Any]) -> list[Any]:
        """The actors Ray found room for within `placement_timeout_s`: their constructor has run (a `ping`
        answers), which takes seconds; the engine comes up later, in `start`."""
        pings = {actor.ping.remote(): actor for actor in actors}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=self.cfg.placement_timeout_s or None)
        answered = set(ready)
        return [actor for ref, actor in pings.items() if ref in answered]

    def _per_worker(self) -> str:
        need = [f"rollout.pool.cpus_per_worker = {self.cfg.cpus_per_worker:g} CPU"]
        if self.cfg.gpus_per_worker:
            need.append(f"rollout.pool.gpus_per_worker = {self.cfg.gpus_per_worker:g} GPU")
        if self.cfg.worker_resource:
            need.append(f"1 {self.cfg.worker_resource!r} (rollout.pool.worker_resource)")
        return ", ".join(need)

    def _free_resources(self) -> str:
        free, total = ray.available_resources(), ray.cluster_resources()
        names = ["CPU", *(["GPU"] if total.get("GPU") or self.cfg.gpus_per_worker else []),
                 *([self.cfg.worker_resource] if self.cfg.worker_resource else [])]
        return "free now: " + ", ".join(f"{name} {free.get(name, 0.0):g} of {total.get(name, 0.0):g}"
                                        for name in names)

    def _no_room(self, placed: int, count: int, required: int) -> str:
        return (f"generator pool: the cluster had room for {placed} of {count} new generators within "
                f"rollout.pool.placement_timeout_s = {self.cfg.placement_timeout_s:g} s, and the pool needs at "
                f"least {required} more (rollout.pool.min_workers = {self.cfg.min_workers}). Each takes "
                f"{self._per_worker()}; {self._free_resources()}. Other jobs may hold the rest: wait for them, "
                f"lower rollout.pool.num_workers / min_workers / cpus_per_worker, or raise placement_timeout_s")

    def resize(self, num_workers: int) -> int:
        """Grow or shrink to `num_workers`, clamped to [min_workers, max_workers]; the size reached (less
        than that when the cluster has no room for more, see `_start_actors`). Call between rollouts: a
        removed actor's in-flight work would be lost to this call."""
        target = max(self.cfg.min_workers, min(self.cfg.max_workers, num_workers))
        if target > self.size:
            self.manager.add_actors(self._start_actors(target - self.size, self.cfg.min_workers - self.size))
        while self.size > target:
            actor_id = max(self.manager.actor_ids())
            ray.kill(self.manager.remove_actor(actor_id))
        return self.size

    def capacity(self) -> int:
        """Generators the cluster's live nodes can hold: the units of `worker_resource` they offer."""
        name = self.cfg.worker_resource
        return int(sum(node["Resources"].get(name, 0.0) for node in ray.nodes() if node.get("Alive")))

    def follow_cluster(self) -> dict[str, float]:
        """Size the pool to `capacity()` within [min_workers, max_workers] (call between rollouts). Returns
        {pool_size, pool_joined, pool_left}: actors started for nodes that joined, actors removed because
        there is no longer room for them."""
        before = self.size
        for r in self.manager.foreach_actor("ping", healthy_only=False, timeout_seconds=30):
            if not r.ok:  # died between steps (its node left): no request of it to serve again
                try:
                    ray.kill(self.manager.remove_actor(r.actor_id))
                except Exception:
                    pass
        target = max(self.cfg.min_workers, min(self.cfg.max_workers, self.capacity()))
        if target > before:
            log.info("generator pool: %d -> %d actors (the cluster offers %d %s)", before, target, self.capacity(),
                     self.cfg.worker_resource)
        self.resize(target)
        return {"pool_size": float(self.size), "pool_joined": float(max(0, self.size - before)),
                "pool_left": float(max(0, before - self.size))}

    def request_capacity(self, rollout_share: float) -> int:
        """Ask the autoscaler for one `worker_resource` unit more than the pool holds (up to max_workers)
        while rollout takes more than `scale_up_share` of a step; withdraw the request otherwise. Returns
        the units requested (0: none)."""
        if not self.cfg.scale_up_share:
            return 0
        from ray.autoscaler.sdk import request_resources

        want = min(self.cfg.max_workers, self.size + 1) if rollout_share > self.cfg.scale_up_share else 0
        if want != self._requested:
            request_resources(bundles=[{self.cfg.worker_resource: 1}] * want)
            self._requested = want
        return want

    def _has_room_for_replacement(self) -> bool:
        """Whether a replacement could be placed: without follow_cluster always (it waits for room); with
        it, only when the live nodes offer more units than the actors left hold."""
        return not self.cfg.follow_cluster or self.capacity() > self.size

    def _replace(self, actor_id: int) -> bool:
        """Replace a dead actor; with follow_cluster and no room left (its node is gone), only remove it.
        Returns whether a replacement was started."""
        try:
            ray.kill(self.manager.remove_actor(actor_id))
        except Exception:  # already gone: nothing to kill
            pass
        if not self._has_room_for_replacement():
            if self.size == 0:
                raise PoolError(f"generator actor {actor_id} died with its node and the cluster offers no "
                                f"{self.cfg.worker_resource!r} for another: no generator is left")
            log.warning("generator actor %d died and its node left the cluster: the pool shrinks to %d",
                        actor_id, self.size)
            return False
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts:
            raise PoolError(f"{self.restarts} generator actors died in this stage (rollout.pool.max_restarts = "
                            f"{self.cfg.max_restarts}); see the Ray logs of the dead actors")
        log.warning("generator actor %d died; starting a replacement (restart %d)", actor_id, self.restarts)
        started = self._start_actors(1, self.cfg.min_workers - self.size)
        self.manager.add_actors(started)
        return bool(started)

    # ------------------------------------------------------------------ weights

    def rebase(self, model_dir: str, version: int) -> None:
        """The weights served (`version`) are now saved in `model_dir`: replacements start from there.
        Call before the learner that published them goes away (its object-store copy goes with it)."""
        engine = self.gen_cfg.engine.model_copy(update={"model": str(model_dir)})
        self.gen_cfg = self.gen_cfg.model_copy(update={"engine": engine, "initial_version": version})
        self.weights = None

    def sync_weights(self, handle: WeightHandle) -> float:
        """Every actor serves `handle` when this returns (seconds taken). Actors that die meanwhile are
        replaced, and their replacements start from `handle`."""
        start = time.perf_counter()
        self.weights = handle
        results = self.manager.foreach_actor("update_weights", kwargs={"handle": handle}, healthy_only=False)
        for r in results:
            if not r.ok:
                self._replace(r.actor_id)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ rollouts

    def rollout(
        self,
        problems: Sequence[Problem],
        group_size: int = 1,
        *,
        seed: int = 0,
        sampling: SamplingConfig | None = None,
    ) -> tuple[list[TreeRecord], RolloutStats]:
        """`group_size` trees per problem, problem by problem (the group of problem i is trees
        [i * group_size, (i + 1) * group_size)). Tree seeds are `seed + position`, so the samples of a
        rollout do not depend on which actor served them."""
        start = time.perf_counter()
        stats = RolloutStats()
        pending: deque[_Request] = deque()
        per = self.cfg.groups_per_request
        for first in range(0, len(problems), per):
            groups = list(range(first, min(first + per, len(problems))))
            rows = [problems[g] for g in groups for _ in range(group_size)]
            seeds = [seed + g * group_size + k for g in groups for k in range(group_size)]
            pending.append(_Request(next(self._ids), groups, problems_to_batch(rows, seeds)))
        stats.requests = len(pending)
        by_id = {r.request_id: r for r in pending}
        done: dict[int, list[TreeRecord]] = {}
        held: dict[int, set[int]] = {}  # actor id -> request ids it holds

        while len(done) < len(by_id):
            self._dispatch(pending, held, sampling)
            results = self.manager.fetch_ready_async_reqs(timeout_seconds=0.2)
            for r in results:
                request_id = int(r.tag)
                if request_id not in by_id:  # a late answer to an earlier rollout that ended in an error
                    continue
                was_held = request_id in held.get(r.actor_id, ())
                held.get(r.actor_id, set()).discard(request_id)
                if not r.ok:  # the manager reports Ray errors only (see `_run_trees`): the actor died
                    # Its requests still held are lost with it (the manager forgot them). A request it
                    # no longer holds was queued again with the first of its errors in this fetch.
                    lost = held.pop(r.actor_id, set()) | ({request_id} if was_held else set())
                    for rid in sorted(lost - done.keys(), reverse=True):
                        pending.appendleft(by_id[rid])
                        stats.redispatched += 1
                    if r.actor_id in self.manager.actor_ids():
                        log.warning("generator actor %d failed: %r", r.actor_id, r.get())
                        if self._replace(r.actor_id):
                            stats.replaced += 1
                        else:
                            stats.lost += 1
                    continue
                value = r.get()
                if isinstance(value, _Failed):
                    req = by_id[request_id]
                    req.attempts += 1
                    if req.attempts >= MAX_REQUEST_ATTEMPTS:
                        raise PoolError(
                            f"request {request_id} (problems {[problems[g].problem_id for g in req.groups]}) failed "
                            f"{req.attempts} times; last error: {value.error}\n{value.traceback}")
                    pending.appendleft(req)
                    stats.redispatched += 1
                    continue
                if request_id in done:
                    stats.duplicates_dropped += 1
                    continue
                done[request_id] = value
                stats.per_actor_trees[r.actor_id] = stats.per_actor_trees.get(r.actor_id, 0) + len(value)
        trees = [tree for rid in sorted(done) for tree in done[rid]]
        stats.wall_s = time.perf_counter() - start
        return trees, stats

    def _dispatch(self, pending: deque[_Request], held: dict[int, set[int]], sampling: SamplingConfig | None) -> None:
        """Hand queued requests to healthy actors with free request slots, least loaded first."""
        while pending:
            healthy = self.manager.healthy_actor_ids()
            if not healthy:
                raise PoolError("no healthy generator actor is left in the pool")
            actor_id = min(healthy, key=lambda a: (len(held.get(a, ())), a))
            if len(held.get(actor_id, ())) >= self.cfg.requests_per_worker:
                return
            req = pending.popleft()
            fired = self.manager.foreach_actor_async(
                _run_trees, tag=str(req.request_id), kwargs={"batch": req.batch, "sampling": sampling},
                remote_actor_ids=[actor_id],
            )
            if not fired:  # the manager's own in-flight limit: try again after the next fetch
                pending.appendleft(req)
                return
            held.setdefault(actor_id, set()).add(req.request_id)

    def stats(self) -> list[dict[str, float]]:
        """Each healthy actor's counters (`GeneratorImpl.stats`)."""
        return [r.get() for r in self.manager.foreach_actor("stats") if r.ok]

    def shutdown(self) -> None:
        for actor_id in list(self.manager.actor_ids()):
            try:
                actor = self.manager.remove_actor(actor_id)
                ray.get(actor.shutdown.remote(), timeout=30)
                ray.kill(actor)
            except Exception:  # a dead actor needs no shutdown
                pass
