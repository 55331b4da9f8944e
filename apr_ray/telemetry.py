"""Live metrics for Grafana: the driver's per-step metric dicts published as Ray custom metrics.

Owns the mapping from apr-ray metric keys (`grpo/reward_mean`, `val/solved`, ...) to Prometheus names
(`metric_name`), the list of keys the Grafana dashboard in `dashboards/apr-ray.json` plots
(`DASHBOARD_METRICS`) and `RayMetrics`, which sets one `ray.util.metrics.Gauge` per key.

Ray's metrics agent exports what a process records on its node's metrics port, prefixed `ray_`, so
`grpo/reward_mean` is scraped as `ray_apr_ray_grpo_reward_mean{run=..., stage=...}`. Gauges, not
counters: every value here is a per-step mean or a current level, and a gauge keeps the last value,
which is what a dashboard polled every few seconds should see between steps.

This is a second sink beside MLflow, never a replacement: MLflow keeps every step of every run, the
Prometheus series lives only while the driver runs and is sampled at the scrape interval.

Must not import torch or anything else of apr_ray; Ray only inside `RayMetrics` (when the first gauge is
made), so the name mapping and the dashboard's key list import and test without Ray.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)

PREFIX = "apr_ray_"
# Ray's exporter puts this before every metric name it serves to Prometheus.
RAY_EXPORT_PREFIX = "ray_"
TAG_KEYS = ("run", "stage")

_NOT_PROMETHEUS = re.compile(r"[^a-zA-Z0-9_]")

# Phases of a GRPO step, as `trainer.PHASES` (not imported: it would pull in torch; a unit test keeps
# the two equal).
GRPO_PHASES = ("problems", "rollout", "score", "train", "sync")
# Evaluation ladder rungs, as `evaluation.LADDER_KEYS` (same reason, same test).
LADDER_RUNGS = ("threads_well_formed", "moves_from_state", "moves_correct_arithmetic", "solved", "spawn_share")

DASHBOARD_METRICS: tuple[str, ...] = (
    # Rewards & accuracy
    "grpo/reward_mean",
    "grpo/accuracy",
    # Ladder (evaluation on the fixed validation problems; val/solved also in the first row)
    *(f"val/{k}" for k in LADDER_RUNGS),
    # Tokens
    "grpo/tokens_total_mean",
    "grpo/tokens_critical_path_mean",
    "val/tokens_total_mean",
    "val/tokens_critical_path_mean",
    "grpo/threads_per_tree",
    "grpo/spawn_rate",
    # Throughput
    "grpo/rollout_tokens_per_s",
    "grpo/learner_tokens_per_s",
    "sft/tokens_per_s",
    # Step time by phase
    *(f"grpo/time_{p}_s" for p in GRPO_PHASES),
    # Sync & pool
    "grpo/sync_s",
    "grpo/version_lag_mean",
    "grpo/pool_size",
    "grpo/pool_restarts",
    "grpo/redispatched_requests",
    "grpo/pool_joined",
    "grpo/pool_left",
    # Losses
    "sft/loss",
    "grpo/loss",
    "grpo/grad_norm",
)


def metric_name(key: str) -> str:
    """The Ray metric name of a metric key: `apr_ray_` + the key with every character outside
    [a-zA-Z0-9_] replaced by `_` (`grpo/reward_mean` -> `apr_ray_grpo_reward_mean`).

    The prefix keeps the name valid whatever the key starts with (Prometheus forbids a leading digit)
    and apart from Ray's own metrics. Prometheus scrapes it with Ray's `ray_` in front.
    """
    return PREFIX + _NOT_PROMETHEUS.sub("_", str(key))


def prometheus_name(key: str) -> str:
    """The name Prometheus stores a metric key under (`ray_` + `metric_name(key)`)."""
    return RAY_EXPORT_PREFIX + metric_name(key)


class GaugeLike(Protocol):
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


GaugeFactory = Callable[[str, str, tuple[str, ...], dict[str, str]], GaugeLike]


def _ray_gauge(name: str, description: str, tag_keys: tuple[str, ...], default_tags: dict[str, str]) -> GaugeLike:
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys).set_default_tags(default_tags)


class RayMetrics:
    """Publishes metric dicts as Ray gauges tagged `run` (fixed per instance) and `stage` (per call).

    One gauge per metric key, made the first time the key is published and reused after. Values that
    are not finite numbers are skipped and counted in `skipped` (Prometheus would store NaN, but a NaN
    gauge hides the last good value on every panel). Telemetry must never stop training, so a key whose
    name collides with another key's (`a/b` and `a_b`) is skipped with one warning instead of raising.

    `gauge_factory(name, description, tag_keys, default_tags)` is for tests; the default makes
    `ray.util.metrics.Gauge`s. Ray needs no `ray.init` to make them, but only a process connected to a
    cluster whose metrics export is on sends the values anywhere.
    """

    def __init__(self, run: str, *, gauge_factory: GaugeFactory | None = None) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"RayMetrics needs a non-empty run name (the `run` label), got {run!r}")
        self.run = run
        self.gauges: dict[str, GaugeLike] = {}  # metric key -> its gauge
        self.skipped = 0  # values not published: not finite, not numbers, or a colliding name
        self._factory = gauge_factory or _ray_gauge
        self._key_of_name: dict[str, str] = {}
        self._warned: set[str] = set()

    def publish(self, metrics: Mapping[str, Any], stage: str) -> int:
        """Set each metric's gauge to its value, tagged with `stage`; returns how many were set."""
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"RayMetrics.publish needs a non-empty stage name (the `stage` label), got {stage!r}")
        published = 0
        for key, value in metrics.items():
            number = _finite(value)
            gauge = self._gauge(str(key)) if number is not None else None
            if gauge is None:
                self.skipped += 1
                continue
            gauge.set(number, tags={"stage": stage})
            published += 1
        return published

    def _gauge(self, key: str) -> GaugeLike | None:
        gauge = self.gauges.get(key)
        if gauge is not None:
            return gauge
        name = metric_name(key)
        owner = self._key_of_name.get(name)
        if owner is not None:  # another key already maps to this name
            if key not in self._warned:
                self._warned.add(key)
                log.warning("metric %r is not published to Ray: its name %s is already used by %r", key, name, owner)
            return None
        gauge = self._factory(name, f"apr-ray metric {key} (every step is also in MLflow)", TAG_KEYS,
                              {"run": self.run})
        self.gauges[key] = gauge
        self._key_of_name[name] = key
        return gauge


def _finite(value: Any) -> float | None:
    """`value` as a finite float, else None (bools count as 0/1, strings are not numbers)."""
    if isinstance(value, str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
