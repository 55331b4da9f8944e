"""The generator pool on real Ray actors (transformers backend, tiny random model): an actor killed in the
middle of a rollout is replaced and its requests served again, each problem's group coming back exactly
once with the seeds of its position; replacements serve the current weights; resizing stays in range;
too many deaths, and a request that keeps raising, fail the rollout with a `PoolError`.

The model is untrained, so trees are garbage that ends at max_tokens; the samples are still a function
of the weights and the tree seed, which is what the seed checks compare.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from apr_ray.config import PoolConfig
from apr_ray.countdown.problems import Problem
from apr_ray.modeling import get_preset, init_model, save_pretrained
from apr_ray.pool import MAX_REQUEST_ATTEMPTS, GeneratorPool, PoolError
from apr_ray.rollout.engine_config import VllmEngineConfig
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.generator import GeneratorConfig, GeneratorImpl, problems_to_batch
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.tokenizer import build_tokenizer
from apr_ray.weight_sync import ObjectStoreTransport

pytestmark = pytest.mark.ray

SEED = 100
# distinct problems, so that a tree's problem_id says which group it belongs to
PROBLEMS = [Problem(10 + i, (i + 1, i + 2, 3)) for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    return save_pretrained(init_model(get_preset("tiny"), tok), tok, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def gen_cfg(model_dir) -> GeneratorConfig:
    return GeneratorConfig(
        engine=VllmEngineConfig(model=str(model_dir)),
        backend="transformers",
        # a base seed makes every sample a function of (weights, tree seed): the seed checks rely on it
        runtime=RuntimeConfig(max_tokens=24, context_window=256, sampling=SamplingConfig(seed=7)),
        max_concurrent_trees=64,
    )


def pool_cfg(**kw) -> PoolConfig:
    return PoolConfig(**{"cpus_per_worker": 0.5, "groups_per_request": 1, "requests_per_worker": 2, **kw})


def kill(actor) -> None:
    """Kill an actor and wait until Ray reports it dead, so that no call can still reach it."""
    ray.kill(actor, no_restart=True)
    assert actor_is_gone(actor)


def actor_is_gone(actor, within_s: float = 60.0) -> bool:
    """ray.kill only asks for the kill: a call made right after it may still be served. True once a call
    fails because the actor died, False if it still answers after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=within_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def outputs(trees) -> list[list[list[int]]]:
    return [[thread.output_ids for thread in tree.threads] for tree in trees]


class KillMidRollout(GeneratorPool):
    """Kills one actor once the rollout is under way: the first time a request is handed out after some
    results came back, the busiest actor (which holds that fresh request, still running) is killed."""

    killed: int | None = None
    _first_pending: int | None = None

    def _dispatch(self, pending, held, sampling):
        if self._first_pending is None:
            self._first_pending = len(pending)
        super()._dispatch(pending, held, sampling)
        refilled = len(pending) < self._first_pending - self.size * self.cfg.requests_per_worker
        if self.killed is None and refilled:
            self.killed = max(held, key=lambda a: (len(held[a]), a))
            assert held[self.killed], "the victim must hold requests in flight"
            ray.kill(self.manager.actors()[self.killed], no_restart=True)


def test_actor_killed_mid_rollout_is_replaced_and_every_group_comes_back_once(ray_cluster, gen_cfg):
    pool = KillMidRollout(gen_cfg, pool_cfg(num_workers=2, max_workers=2))
    try:
        assert pool.manager.actor_ids() == [0, 1]
        trees, stats = pool.rollout(PROBLEMS, group_size=2, seed=SEED)

        assert pool.killed in (0, 1)
        assert len(trees) == len(PROBLEMS) * 2 == 24
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS for _ in range(2)]
        assert [(t.target, t.nums) for t in trees[::2]] == [(p.target, list(p.nums)) for p in PROBLEMS]
        assert stats.requests == 12 and stats.redispatched >= 1 and stats.replaced == 1
        assert stats.duplicates_dropped == 0
        assert pool.restarts == 1 and pool.size == 2
        assert pool.manager.actor_ids() == sorted({0, 1} - {pool.killed} | {2})  # the replacement is id 2
        assert sum(stats.per_actor_trees.values()) == 24
        assert stats.per_actor_trees.get(2, 0) > 0  # the replacement served some of the lost requests

        # Tree k ran with seed SEED + k whichever actor served it: the same trees computed here, in this
        # process, from hand-written seeds. (The two trees of a group differ: their seeds do.)
        reference = GeneratorImpl(gen_cfg)
        rows = [p for p in PROBLEMS for _ in range(2)]
        expected = asyncio.run(reference.run_trees(problems_to_batch(rows, [SEED + k for k in range(24)])))
        assert outputs(trees) == outputs(expected)
        assert all(outputs(trees)[k] != outputs(trees)[k + 1] for k in range(0, 24, 2))
    finally:
        pool.shutdown()


def test_replacement_serves_the_current_weights(ray_cluster, gen_cfg):
    tok = build_tokenizer()
    other = init_model(get_preset("tiny").model_copy(update={"seed": 1}), tok)
    handle = ObjectStoreTransport().publish(other.state_dict(), 3)
    pool = GeneratorPool(gen_cfg, pool_cfg(num_workers=1))
    try:
        assert [r.get() for r in pool.manager.foreach_actor("policy_version")] == [0]
        pool.sync_weights(handle)
        assert pool.version == 3 and [r.get() for r in pool.manager.foreach_actor("policy_version")] == [3]
        kill(pool.manager.actors()[0])
        trees, stats = pool.rollout(PROBLEMS[:4], group_size=2, seed=SEED)

        assert stats.replaced == 1 and pool.restarts == 1 and pool.manager.actor_ids() == [1]
        assert [r.get() for r in pool.manager.foreach_actor("policy_version")] == [3]
        assert [t.policy_version for t in trees] == [3] * 8
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:4] for _ in range(2)]
        # and the weights are version 3's, not only its number: the same trees from a model loaded with them
        reference = GeneratorImpl(gen_cfg)
        asyncio.run(reference.load_weights(list(other.state_dict().items()), 3))
        rows = [p for p in PROBLEMS[:4] for _ in range(2)]
        expected = asyncio.run(reference.run_trees(problems_to_batch(rows, [SEED + k for k in range(8)])))
        assert outputs(trees) == outputs(expected)
    finally:
        pool.shutdown()


def test_resize_clamps_to_the_range_and_rollouts_use_the_new_actors(ray_cluster, gen_cfg):
    pool = GeneratorPool(gen_cfg, pool_cfg(num_workers=1, min_workers=1, max_workers=2, requests_per_worker=1))
    try:
        assert pool.size == 1 and pool.manager.actor_ids() == [0]
        assert pool.resize(0) == 1 and pool.manager.actor_ids() == [0]  # min_workers
        assert pool.resize(5) == 2 and pool.manager.actor_ids() == [0, 1]  # max_workers

        trees, stats = pool.rollout(PROBLEMS[:4], group_size=2, seed=SEED)
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:4] for _ in range(2)]
        # one request per actor at a time: the first two requests went one to each actor
        assert set(stats.per_actor_trees) == {0, 1} and sum(stats.per_actor_trees.values()) == 8
        assert stats.redispatched == stats.replaced == 0 and pool.restarts == 0

        removed = pool.manager.actors()[1]
        assert pool.resize(1) == 1 and pool.manager.actor_ids() == [0]
        assert actor_is_gone(removed)  # a removed actor is killed, not just forgotten
        trees, stats = pool.rollout(PROBLEMS[:2], group_size=1, seed=SEED)
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:2]]
        assert stats.per_actor_trees == {0: 2}
    finally:
        pool.shutdown()


def test_a_pool_the_cluster_has_no_room_for_goes_on_smaller_or_fails_naming_what_is_missing(ray_cluster, gen_cfg):
    """Another job holding the CPUs must not hang the run: a generator Ray cannot place within
    placement_timeout_s is given up. The pool goes on with what fits, down to min_workers; below that the
    error names the resources each generator takes and what the cluster has free."""
    free = ray.available_resources()["CPU"]
    cfg = pool_cfg(num_workers=3, min_workers=1, max_workers=3, cpus_per_worker=free / 2, placement_timeout_s=10)
    pool = GeneratorPool(gen_cfg, cfg)
    try:
        assert pool.size == 2  # the third had no room
        trees, _ = pool.rollout(PROBLEMS[:2], group_size=1, seed=SEED)
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:2]]
    finally:
        pool.shutdown()
    with pytest.raises(PoolError, match=r"room for 2 of 3 new generators.*rollout\.pool\.min_workers = 3.*"
                                        rf"cpus_per_worker = {free / 2:g} CPU.*free now: CPU [\d.]+ of 4"):
        GeneratorPool(gen_cfg, cfg.model_copy(update={"min_workers": 3}))
    deadline = time.monotonic() + 60  # Ray frees a killed actor's CPUs a moment later
    while ray.available_resources().get("CPU", 0.0) < free and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) >= free  # no actor of the failed start is left holding CPUs


def test_failing_requests_and_too_many_deaths_end_the_rollout_with_a_pool_error(ray_cluster, gen_cfg):
    pool = GeneratorPool(gen_cfg, pool_cfg(num_workers=1, max_restarts=0))
    try:
        # A malformed call (sampling must be a SamplingConfig): the actor raises on every request. The
        # rollout gives up after MAX_REQUEST_ATTEMPTS tries of one request.
        with pytest.raises(PoolError, match=rf"failed {MAX_REQUEST_ATTEMPTS} times; last error: AttributeError"):
            pool.rollout(PROBLEMS[:3], group_size=1, seed=SEED, sampling={"temperature": 0.0})
        # an application error is no death: the actor was neither marked unhealthy nor replaced
        assert pool.restarts == 0 and pool.manager.actor_ids() == pool.manager.healthy_actor_ids() == [0]

        # late answers to the failed rollout (its other requests were in flight) do not leak into the next
        trees, stats = pool.rollout(PROBLEMS[:3], group_size=1, seed=SEED)
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:3]]
        assert stats.per_actor_trees == {0: 3} and stats.redispatched == 0 and pool.restarts == 0

        # a death beyond max_restarts (0 here) ends the rollout
        kill(pool.manager.actors()[0])
        with pytest.raises(PoolError, match=r"rollout\.pool\.max_restarts = 0"):
            pool.rollout(PROBLEMS[:2], group_size=2, seed=SEED)
        assert pool.restarts == 1
    finally:
        pool.shutdown()


def test_an_actor_whose_engine_died_is_replaced_and_no_tree_ends_in_error(ray_cluster, gen_cfg):
    from apr_ray.types import EndReason

    # Defined here, not at module level, so that Ray ships them by value (actors cannot import this file).
    class DeadEngine:
        """What a vLLM engine whose core process died looks like from the actor: every request raises."""

        dead = True
        eos_token_id = 2

        async def generate(self, *args, **kwargs):
            raise RuntimeError("EngineDeadError: EngineCore encountered an issue")

    def kill_engine(generator) -> bool:
        generator.runtime.engine = generator.engine = DeadEngine()
        generator._runtimes = {None: generator.runtime}
        return True

    pool = GeneratorPool(gen_cfg, pool_cfg(num_workers=1))
    try:
        pool.rollout(PROBLEMS[:1], group_size=1, seed=SEED)  # the engine is up
        assert [r.get() for r in pool.manager.foreach_actor(kill_engine)] == [True]
        trees, stats = pool.rollout(PROBLEMS[:4], group_size=2, seed=SEED)

        assert stats.replaced == 1 and pool.restarts == 1 and pool.manager.actor_ids() == [1]
        assert [t.problem_id for t in trees] == [p.problem_id for p in PROBLEMS[:4] for _ in range(2)]
        assert all(r.end_reason is not EndReason.ERROR for t in trees for r in t.threads)
    finally:
        pool.shutdown()
