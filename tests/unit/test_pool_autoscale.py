"""`GeneratorPool.request_capacity`: what the pool asks of Ray's autoscaler (`request_resources`) from the
share of a step that rollout took. The pool's actors are not needed: only its size is read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from apr_ray.config import PoolConfig
from apr_ray.pool import GeneratorPool


def pool_of(size: int, **cfg) -> GeneratorPool:
    pool = GeneratorPool.__new__(GeneratorPool)
    pool.cfg = PoolConfig(worker_resource="rollout", follow_cluster=True, max_workers=3, **cfg)
    pool.manager = SimpleNamespace(num_actors=lambda: size)
    pool._requested = 0
    return pool


@pytest.fixture
def requests(monkeypatch):
    import ray.autoscaler.sdk

    calls: list[list[dict]] = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: calls.append(bundles))
    return calls


def test_rollout_bound_steps_ask_for_one_unit_more_then_withdraw(requests):
    pool = pool_of(2, scale_up_share=0.6)
    assert pool.request_capacity(0.8) == 3
    assert requests == [[{"rollout": 1}] * 3]
    assert pool.request_capacity(0.9) == 3 and len(requests) == 1  # the standing request is not repeated
    assert pool.request_capacity(0.4) == 0
    assert requests[-1] == []  # withdrawn: the autoscaler may scale down again


def test_the_request_stops_at_max_workers_and_is_off_by_default(requests):
    assert pool_of(3, scale_up_share=0.5).request_capacity(0.99) == 3  # already at max: no unit beyond it
    assert pool_of(2).request_capacity(0.99) == 0 and requests == [[{"rollout": 1}] * 3]
