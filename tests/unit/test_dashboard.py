"""The Grafana dashboard (dashboards/apr-ray.json) against the metric names `RayMetrics` publishes:
its structure, that every series it queries is a published key and every dashboard key is plotted,
that those keys are ones the trainer and SFT loop really log, and the key -> Prometheus name mapping.
`RayMetrics` itself runs here on a fake gauge (no Ray); tests/ray/test_telemetry.py runs it on Ray's.
"""

import inspect
import json
import math
import re
from pathlib import Path

import pytest

from apr_ray import telemetry
from apr_ray.telemetry import DASHBOARD_METRICS, RayMetrics, metric_name, prometheus_name

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "apr-ray.json"
SERIES = re.compile(r"ray_apr_ray_[A-Za-z0-9_]*")


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _all_panels(dash):
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _graphs(dash):
    return [p for p in _all_panels(dash) if p["type"] != "row"]


def _exprs(dash):
    return [t["expr"] for p in _graphs(dash) for t in p["targets"]]


# ---------------------------------------------------------------- name mapping


@pytest.mark.parametrize(
    "key,name",
    [
        ("grpo/reward_mean", "apr_ray_grpo_reward_mean"),
        ("grpo/time_rollout_s", "apr_ray_grpo_time_rollout_s"),
        ("val/moves_correct_arithmetic", "apr_ray_val_moves_correct_arithmetic"),
        ("sft/tokens_per_s", "apr_ray_sft_tokens_per_s"),
        ("a.b-c d:e", "apr_ray_a_b_c_d_e"),  # ':' is legal in Prometheus but reserved for recording rules
        ("1st/x", "apr_ray_1st_x"),  # the prefix keeps a leading digit legal
        ("é/%", "apr_ray_" + "___"),  # one '_' per character, non-ASCII letters included
    ],
)
def test_metric_name(key, name):
    assert metric_name(key) == name
    assert prometheus_name(key) == "ray_" + name
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name)


def test_dashboard_names_are_distinct():
    names = [metric_name(k) for k in DASHBOARD_METRICS]
    assert len(names) == len(set(names)) == len(DASHBOARD_METRICS)


# ---------------------------------------------------------------- the dashboard JSON


def test_dashboard_structure(dashboard):
    assert dashboard["title"] == "apr-ray" and dashboard["uid"] == "apr-ray"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = _all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for p in panels:
        assert isinstance(p["id"], int) and p["title"].strip(), p
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    for p in _graphs(dashboard):
        assert p["targets"], f"panel {p['title']!r} has no targets"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_rows(dashboard):
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Rewards & accuracy", "Ladder (validation)", "Tokens", "Throughput", "Step time by phase",
                    "Sync & pool", "Losses"]


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["datasource"]["uid"] == "${datasource}"
    assert run["definition"] == run["query"]["query"] == "label_values(ray_apr_ray_grpo_reward_mean, run)"
    assert run["multi"] and run["includeAll"]


def test_every_series_is_a_published_key_filtered_by_run(dashboard):
    published = {prometheus_name(k) for k in DASHBOARD_METRICS}
    exprs = _exprs(dashboard)
    for expr in exprs:
        series = SERIES.findall(expr)
        assert series, f"expr queries no apr-ray metric: {expr}"
        for name in series:
            assert name in published, f"{name} in {expr!r} is not ray_ + metric_name(k) for a k in DASHBOARD_METRICS"
        # every selector is restricted to the chosen runs, so two runs never mix in one series
        assert expr.count('{run=~"$run"}') == len(series), expr


def test_every_dashboard_key_is_plotted(dashboard):
    plotted = {name for expr in _exprs(dashboard) for name in SERIES.findall(expr)}
    missing = [k for k in DASHBOARD_METRICS if prometheus_name(k) not in plotted]
    assert not missing, f"in DASHBOARD_METRICS but on no panel: {missing}"


def test_step_time_panel_stacks_every_phase(dashboard):
    (panel,) = [p for p in _graphs(dashboard) if p["title"].startswith("GRPO step time by phase")]
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert panel["repeat"] == "run"  # stacking two runs' phases on each other would add their times
    phases = [SERIES.findall(t["expr"])[0] for t in panel["targets"]]
    assert phases == [prometheus_name(f"grpo/time_{p}_s") for p in telemetry.GRPO_PHASES]


# ---------------------------------------------------------------- the keys are real


def test_copied_constants_match_their_sources():
    from apr_ray.evaluation import LADDER_KEYS
    from apr_ray.trainer import PHASES

    assert telemetry.GRPO_PHASES == PHASES
    assert telemetry.LADDER_RUNGS == LADDER_KEYS


def test_dashboard_keys_are_logged_by_the_code():
    """Each key is produced by the function that logs it (run on empty/fake inputs), or for the
    literal keys of `GRPOTrainer._step`, written in its source."""
    from apr_ray import ladder
    from apr_ray.sft import SFTResult, _window_metrics
    from apr_ray.trainer import PHASES, GRPOTrainer, rollout_metrics

    produced = {f"grpo/{k}" for k in rollout_metrics([], [], 0)}
    produced |= {f"val/{k}" for k in ladder.summarize([], lambda ids: "")}
    produced |= set(_window_metrics([{"loss": 1.0, "grad_norm": 1.0, "seq_tokens": 10, "step_s": 1.0}], 1.0,
                                    SFTResult(steps=1, tokens=10, wall_s=1.0, train_s=1.0, eval_s=0.0)))
    produced |= {f"grpo/time_{p}_s" for p in PHASES}
    step_source = inspect.getsource(GRPOTrainer._step)
    produced |= {k for k in DASHBOARD_METRICS if k.startswith("grpo/") and f'"{k}"' in step_source}
    # the learner's step dict keys, copied with a grpo/ prefix by _step
    produced |= {f"grpo/{k}" for k in ("loss", "grad_norm") if f'"{k}"' in step_source}
    missing = [k for k in DASHBOARD_METRICS if k not in produced]
    assert not missing, f"DASHBOARD_METRICS keys that no code logs: {missing}"


# ---------------------------------------------------------------- RayMetrics on a fake gauge


class FakeGauge:
    def __init__(self, name, description, tag_keys, default_tags):
        self.name, self.description, self.tag_keys, self.default_tags = name, description, tag_keys, default_tags
        self.values = []

    def set(self, value, tags=None):
        self.values.append((value, {**self.default_tags, **(tags or {})}))


def test_publish_sets_one_gauge_per_key_and_skips_non_finite():
    made = []

    def factory(*args):
        made.append(FakeGauge(*args))
        return made[-1]

    m = RayMetrics("run-7", gauge_factory=factory)
    n = m.publish({"grpo/reward_mean": 0.5, "grpo/loss": float("nan"), "grpo/step_s": math.inf,
                   "grpo/pool_size": 3, "note": "text", "flag": True}, stage="grpo")
    assert n == 3 and m.skipped == 3
    assert n == m.publish({"grpo/reward_mean": 0.75, "grpo/pool_size": 4.0, "flag": False}, stage="grpo")
    assert m.publish({"grpo/reward_mean": 0.25}, stage="sft") == 1
    assert [g.name for g in made] == ["apr_ray_grpo_reward_mean", "apr_ray_grpo_pool_size", "apr_ray_flag"]
    assert set(m.gauges) == {"grpo/reward_mean", "grpo/pool_size", "flag"}
    reward = m.gauges["grpo/reward_mean"]
    assert reward.tag_keys == ("run", "stage") and reward.default_tags == {"run": "run-7"}
    assert reward.values == [(0.5, {"run": "run-7", "stage": "grpo"}), (0.75, {"run": "run-7", "stage": "grpo"}),
                             (0.25, {"run": "run-7", "stage": "sft"})]
    assert m.gauges["grpo/pool_size"].values[-1] == (4.0, {"run": "run-7", "stage": "grpo"})
    assert m.gauges["flag"].values == [(1.0, {"run": "run-7", "stage": "grpo"}), (0.0, {"run": "run-7", "stage": "grpo"})]


def test_colliding_names_keep_the_first_key(caplog):
    m = RayMetrics("r", gauge_factory=FakeGauge)
    assert m.publish({"a/b": 1.0, "a_b": 2.0}, stage="s") == 1
    assert m.publish({"a_b": 3.0}, stage="s") == 0
    assert list(m.gauges) == ["a/b"] and m.gauges["a/b"].values == [(1.0, {"run": "r", "stage": "s"})]
    assert m.skipped == 2
    assert sum("a_b" in r.getMessage() for r in caplog.records) == 1  # warned once, not every step


def test_bad_run_or_stage_is_refused():
    with pytest.raises(ValueError, match="run name"):
        RayMetrics("", gauge_factory=FakeGauge)
    with pytest.raises(ValueError, match="stage"):
        RayMetrics("r", gauge_factory=FakeGauge).publish({"x": 1.0}, stage="")
