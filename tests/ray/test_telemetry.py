"""`RayMetrics` on real `ray.util.metrics.Gauge`s in a local Ray cluster: Ray accepts the names, the
tag keys and the default run tag (a missing tag would raise in `Gauge.set`), NaN is skipped, and each
key gets one gauge that later calls reuse."""

import math

import pytest

from apr_ray.telemetry import DASHBOARD_METRICS, RayMetrics

pytestmark = pytest.mark.ray


def test_publish_on_ray_gauges(ray_cluster):
    from ray.util.metrics import Gauge

    m = RayMetrics("test-run")
    step = {"grpo/reward_mean": 0.5, "grpo/accuracy": 0.25, "grpo/loss": float("nan"), "grpo/time_rollout_s": 1.5}
    assert m.publish(step, stage="grpo") == 3
    first = dict(m.gauges)
    assert set(first) == {"grpo/reward_mean", "grpo/accuracy", "grpo/time_rollout_s"}
    assert all(isinstance(g, Gauge) for g in first.values())
    assert first["grpo/reward_mean"].info["name"] == "apr_ray_grpo_reward_mean"
    assert first["grpo/reward_mean"].info["default_tags"] == {"run": "test-run"}

    assert m.publish(step | {"grpo/loss": 0.1}, stage="grpo") == 4
    assert m.publish({"val/solved": 0.5, "grpo/reward_mean": math.inf}, stage="sft") == 1
    assert len(m.gauges) == 5 and m.skipped == 2
    assert all(m.gauges[k] is g for k, g in first.items())  # cached, not remade per call

    # every dashboard key is a name Ray accepts (an invalid one is silently discarded by Ray)
    assert m.publish(dict.fromkeys(DASHBOARD_METRICS, 1.0), stage="grpo") == len(DASHBOARD_METRICS)
    assert all(not g._discard_metric for g in m.gauges.values())
