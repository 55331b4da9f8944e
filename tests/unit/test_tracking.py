"""MLflow tracking on a local sqlite store, read back with `MlflowClient`: the parent run with nested
stage runs, flattened and truncated params, metric histories without non-finite values, artifacts
(text, file, directory, model directory, figure), URI resolution, end statuses, and the null tracker.

One sqlite database is shared by the module: creating one runs every MLflow migration (~2 s).
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from apr_ray import tracking
from apr_ray.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    flatten,
    make_tracker,
    plot_metric_curves,
    resolve_tracking_uri,
)

mlflow_tracking = pytest.importorskip("mlflow.tracking")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(config logging to a shared sqlite store, a client reading it)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'shared.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="tests")
    tracking._quiet_mlflow()  # this reading client creates the store, before any Tracker could quiet it
    return cfg, mlflow_tracking.MlflowClient(tracking_uri=uri)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_flatten_nested_dicts_to_dotted_keys():
    tree = {"name": "tiny", "data": {"problems": {"num_operands": 3, "ops": ["+", "-"]}, "seed": 0}, "empty": {}}
    assert flatten(tree) == {
        "name": "tiny",
        "data.problems.num_operands": 3,
        "data.problems.ops": ["+", "-"],
        "data.seed": 0,
        "empty": {},
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": 1}
    assert flatten(TrackingConfig(experiment="x")) == {
        "enabled": True,
        "tracking_uri": None,
        "experiment": "x",
        "run_name": None,
    }


def test_tracking_uri_from_config_then_env_then_sqlite_in_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "tiny"
    assert resolve_tracking_uri(TrackingConfig(), out) == f"sqlite:///{out / 'mlflow.db'}"
    assert resolve_tracking_uri(TrackingConfig(), out).startswith("sqlite:////")  # absolute path
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig(), Path("runs/tiny")) == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), out) == "http://mlflow.example:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////x/y.db"), out) == "sqlite:////x/y.db"


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="experimnt"):
        TrackingConfig(experimnt="x")


def test_pipeline_run_with_nested_stage_runs(store, tmp_path):
    cfg, client = store
    params = {"name": "tiny", "seed": 7, "data": {"problems": {"num_operands": 3, "num_max": 30}}}
    with Tracker(cfg, tmp_path, "pipeline", params=params, tags={"job": "unit"}) as parent:
        sft = parent.child("sft", params={"lr": 1e-4, "epochs": 2})
        sft.end()
        grpo = parent.child("grpo", params={"group_size": 8})
        grpo.end()

    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("pipeline-")  # no tracking.run_name: the given name + a timestamp
    assert run.data.tags["job"] == "unit"
    assert run.data.params == {
        "name": "tiny",
        "seed": "7",
        "data.problems.num_operands": "3",
        "data.problems.num_max": "30",
    }
    assert tracking.PARENT_TAG not in run.data.tags

    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["grpo", "sft"]
    by_name = {r.info.run_name: r for r in children}
    assert by_name["sft"].data.params == {"lr": "0.0001", "epochs": "2"}
    assert by_name["grpo"].data.params == {"group_size": "8"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.info.experiment_id == parent.experiment_id for r in children)


def test_params_are_truncated_and_logged_past_the_batch_limit(store, tmp_path):
    cfg, client = store
    many = {f"p{i:03d}": i for i in range(250)}
    with Tracker(cfg, tmp_path, "params") as t:
        t.log_params({"group": many, "long": "x" * 7000, "bad=key": 1, "/a//b/": 2})
    params = client.get_run(t.run_id).data.params
    assert len(params) == 250 + 3
    assert params["group.p000"] == "0" and params["group.p249"] == "249"
    assert len(params["long"]) == 6000 and params["long"].endswith("...")
    assert params["bad_key"] == "1"
    assert params["a/b"] == "2"


def test_metric_history_and_non_finite_values_skipped(store, tmp_path):
    cfg, client = store
    bad = {2: math.nan, 3: math.inf}
    with Tracker(cfg, tmp_path, "metrics") as t:
        for step in range(5):
            t.log_metrics({"loss": 1.0 / (step + 1), "reward": step * 0.25, "bad": bad.get(step, -step)}, step=step)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "loss"))
    assert loss == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25), (4, 0.2)]
    reward = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "reward"))
    assert reward == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    bad_history = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "bad"))
    assert bad_history == [(0, 0.0), (1, -1.0), (4, -4.0)]
    assert t.skipped_metrics == {"bad": 2}
    with pytest.raises(TypeError, match="'note' at step 5"):
        t.log_metrics({"note": "high"}, step=5)


def test_artifacts_text_file_directory_model_and_figure(store, tmp_path):
    cfg, client = store
    (tmp_path / "notes.txt").write_text("hello")
    model = tmp_path / "hf_model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    fig = plot_metric_curves({"acc": [(0, 0.1), (1, 0.4)]}, "eval")
    with Tracker(cfg, tmp_path, "artifacts") as t:
        t.log_text("name: tiny\nseed: 0\n", "config.yaml")
        t.log_artifact(tmp_path / "notes.txt")
        t.log_artifact(tmp_path / "notes.txt", "extra")
        t.log_artifact(model, "checkpoint")
        t.log_model_dir(model)
        t.log_figure(fig, "plots/eval.png")
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            t.log_artifact(tmp_path / "missing.txt")
        with pytest.raises(NotADirectoryError, match="notes.txt"):
            t.log_model_dir(tmp_path / "notes.txt")

    def listing(path=None):
        return sorted((a.path, a.is_dir) for a in client.list_artifacts(t.run_id, path))

    assert listing() == [
        ("checkpoint", True),
        ("config.yaml", False),
        ("extra", True),
        ("model", True),
        ("notes.txt", False),
        ("plots", True),
    ]
    assert listing("model") == [("model/config.json", False), ("model/sub", True)]
    assert listing("model/sub") == [("model/sub/weights.bin", False)]
    assert listing("checkpoint") == [("checkpoint/config.json", False), ("checkpoint/sub", True)]
    assert listing("extra") == [("extra/notes.txt", False)]
    # The store keeps artifacts beside the database, not in the working directory.
    artifact_dir = Path(client.get_run(t.run_id).info.artifact_uri.removeprefix("file://"))
    assert (artifact_dir / "config.yaml").read_text() == "name: tiny\nseed: 0\n"
    assert (artifact_dir / "plots" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (artifact_dir / "model" / "sub" / "weights.bin").read_bytes() == b"\x00\x01"


def test_default_store_is_sqlite_and_artifacts_in_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "tiny"
    with make_tracker(TrackingConfig(), out, "tiny") as t:
        t.log_text("x", "a.txt")
    assert isinstance(t, Tracker)
    assert t.tracking_uri == f"sqlite:///{out / 'mlflow.db'}"
    assert (out / "mlflow.db").is_file()
    assert (out / "mlartifacts" / t.run_id / "artifacts" / "a.txt").read_text() == "x"
    assert not (tmp_path / "mlruns").exists()
    client = mlflow_tracking.MlflowClient(tracking_uri=t.tracking_uri)
    assert client.get_run(t.run_id).info.run_name.startswith("tiny-20")  # name + timestamp
    # A second job in the same directory reuses the experiment; an explicit run name is kept.
    with Tracker(TrackingConfig(run_name="again"), out, "tiny") as t2:
        pass
    assert t2.experiment_id == t.experiment_id
    assert client.get_run(t2.run_id).info.run_name == "again"
    assert t.run_id in t.ui_hint() and t.experiment_id in t.ui_hint()
    assert t.ui_hint().startswith(f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}\n")


def test_env_tracking_uri_is_used(store, tmp_path, monkeypatch):
    cfg, client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    out = tmp_path / "out"
    with Tracker(TrackingConfig(experiment="tests"), out, "from-env") as t:
        pass
    assert t.tracking_uri == cfg.tracking_uri
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert not (out / "mlflow.db").exists()


def test_end_status_is_kept_and_end_is_idempotent(store, tmp_path):
    cfg, client = store
    t = Tracker(cfg, tmp_path, "killed")
    child = t.child("eval")
    with pytest.raises(ValueError, match="'DONE'"):
        t.end("DONE")
    t.end("KILLED")
    t.end("FINISHED")  # no effect: already ended
    assert client.get_run(t.run_id).info.status == "KILLED"
    # An open child ends with its parent.
    assert client.get_run(child.run_id).info.status == "KILLED"
    with pytest.raises(RuntimeError, match="has ended"):
        t.child("late")


def test_exception_in_with_marks_runs_failed_and_interrupt_killed(store, tmp_path):
    cfg, client = store
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(cfg, tmp_path, "failing") as t:
            child = t.child("sft")
            raise RuntimeError("boom")
    assert client.get_run(t.run_id).info.status == "FAILED"
    assert client.get_run(child.run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):
        with Tracker(cfg, tmp_path, "interrupted") as t2:
            raise KeyboardInterrupt
    assert client.get_run(t2.run_id).info.status == "KILLED"


def test_null_tracker_does_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    t = make_tracker(TrackingConfig(enabled=False), out, "off", params={"a": 1})
    assert isinstance(t, NullTracker)
    with t:
        c = t.child("sft", params={"b": 2})
        assert isinstance(c, NullTracker)
        for tr in (t, c):
            tr.log_params({"x": {"y": 1}})
            tr.log_metrics({"loss": 1.0}, step=0)
            tr.log_text("x", "a.txt")
            tr.log_artifact(tmp_path / "does-not-matter")
            tr.log_model_dir(tmp_path / "nor-this")
            tr.log_figure(None, "f.png")
            tr.end("KILLED")
    assert "off" in t.ui_hint()
    assert not out.exists()
    # Without mlflow installed, tracking falls back to the null tracker instead of failing the job.
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    assert isinstance(make_tracker(TrackingConfig(), out, "no-mlflow"), NullTracker)
    assert not out.exists()


def test_module_imports_neither_mlflow_nor_matplotlib():
    heavy = "('mlflow', 'matplotlib', 'torch', 'ray')"
    code = f"import sys, apr_ray.tracking; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_plot_metric_curves_one_subplot_per_metric():
    history = {
        "acc": [(2, 0.5), (0, 0.1), (1, 0.3)],
        "loss": [(0, 2.0), (1, math.nan), (2, 1.0)],
        "len": [(0, 10.0)],
        "kl": [(0, 0.0), (1, 0.01)],
    }
    fig = plot_metric_curves(history, "eval")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["acc", "loss", "len", "kl"]
    line = axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2]  # sorted by step
    assert list(line.get_ydata()) == [0.1, 0.3, 0.5]
    assert fig.get_suptitle() == "eval"
    assert axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 3)
    assert len(plot_metric_curves({}, "nothing").get_axes()) == 1
