"""Experiment tracking: one MLflow run per job, with a parent (pipeline) run and nested stage runs.

Owns where runs are stored (config, else `$MLFLOW_TRACKING_URI`, else a sqlite file in the output
directory with artifacts beside it), how params and metrics are made acceptable to MLflow (nested
configs flattened to dotted keys, values cut to MLflow's length limit, batches split at its size
limits, non-finite metrics skipped and counted) and the metric-curve figure of evaluations.

Uses `MlflowClient` with explicit run ids, never `mlflow.start_run`: the fluent API keeps the active
run in global state, which makes nested runs implicit and breaks when two threads log at once.
mlflow is imported only when a `Tracker` is built, so this module imports on machines without it
(`NullTracker` stands in). Must not import torch, Ray or anything else of apr_ray; matplotlib only
inside `plot_metric_curves`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation), copied so this module needs no mlflow to import.
MAX_PARAM_VALUE_LEN = 6000
MAX_KEY_LEN = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"

# Characters MLflow accepts in param and metric names (POSIX rule; Windows also forbids ':').
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="log to MLflow; false: no tracking at all")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite under output_dir"
    )
    experiment: str = Field("apr-ray", min_length=1, max_length=500, description="MLflow experiment name")
    run_name: str | None = Field(None, description="name of the pipeline run; None: the config's name + a timestamp")


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    """The config's URI, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<abs output_dir>/mlflow.db`."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    # Absolute: a relative sqlite path would follow the working directory of whoever opens it later.
    return f"sqlite:///{(Path(output_dir) / DEFAULT_DB).resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local sqlite URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not path or path.startswith(":memory:") else Path(path)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys: {"data": {"seed": 1}} -> {"data.seed": 1}.

    Pydantic models are dumped first; lists and other leaves are kept as they are. An empty dict
    stays as a leaf so its key is not lost.
    """
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _safe_key(key: str) -> str:
    """A name MLflow accepts: bad characters to '_', no empty or '.'/'..' path segments, <= 250 chars.

    Keys can come from data (dict-valued config fields), and a rejected name would stop the job in
    the middle of training, so they are repaired rather than refused.
    """
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(key)).split("/") if p not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:MAX_KEY_LEN]


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE_LEN else text[: MAX_PARAM_VALUE_LEN - 3] + "..."


def _quiet_mlflow() -> None:
    """Keep MLflow offline and quiet: no usage telemetry, no INFO lines on every database creation."""
    # Telemetry would try to reach the internet from every process that logs; respect an explicit choice.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Raised by MLflow's own mappers on every store creation; nothing a user of MLflow can act on.
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")


class Tracker:
    """One MLflow run; `child` makes a nested run. Use as a context manager or call `end`.

    Lives in the driver process: actors return their metrics, the driver logs them.
    """

    run_id: str
    experiment_id: str
    tracking_uri: str
    run_name: str

    def __init__(
        self,
        cfg: TrackingConfig,
        output_dir: Path,
        run_name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.tracking_uri = resolve_tracking_uri(cfg, output_dir)
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        # A local database keeps its artifacts beside it (for the default: <output_dir>/mlartifacts);
        # MLflow's own default would be ./mlruns in whatever directory the job was started from.
        artifact_location = str(db.parent.resolve() / DEFAULT_ARTIFACTS) if db is not None else None
        experiment_id = _get_or_create_experiment(client, cfg.experiment, artifact_location)
        name = cfg.run_name or f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._start(client, experiment_id, name, tags or {})
        if params:
            self.log_params(params)

    def _start(self, client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str]) -> None:
        run = client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
        self._client = client
        self.experiment_id = experiment_id
        self.run_id = run.info.run_id
        self.run_name = name
        self._children: list[Tracker] = []
        self._ended = False
        # Metric key -> how many values were skipped as NaN or infinite.
        self.skipped_metrics: Counter[str] = Counter()

    def child(self, name: str, params: dict[str, Any] | None = None) -> Tracker:
        """A nested run (an SFT, GRPO or eval stage) under this one, in the same experiment."""
        if self._ended:
            raise RuntimeError(f"run {self.run_name!r} ({self.run_id}) has ended; it cannot get child {name!r}")
        sub = object.__new__(Tracker)
        sub.tracking_uri = self.tracking_uri
        sub._start(self._client, self.experiment_id, name, {PARENT_TAG: self.run_id})
        self._children.append(sub)
        if params:
            sub.log_params(params)
        return sub

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened to dotted keys, values as text cut to 6000 chars, in batches of 100."""
        from mlflow.entities import Param

        flat = {_safe_key(k): _param_value(v) for k, v in flatten(params).items()}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All values at `step` in one call; NaN and infinities are skipped and counted in `skipped_metrics`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} at step {step}: {value!r} is not a number") from None
            if not math.isfinite(number):
                if key not in self.skipped_metrics:
                    log.warning("metric %r at step %d is %s; skipping non-finite values of it", key, step, number)
                self.skipped_metrics[key] += 1
                continue
            items.append(Metric(_safe_key(key), number, now, int(step)))
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (e.g. "config.yaml", "eval/summary.txt")."""
        self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or the contents of a directory, under `artifact_path` (None: the run's root)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log not found: {path}")

    def log_model_dir(self, path: Path, artifact_path: str = "model") -> None:
        """A Hugging Face model directory as plain files (mlflow.transformers would need the hub)."""
        if not Path(path).is_dir():
            raise NotADirectoryError(f"model directory to log not found: {path}")
        self.log_artifact(path, artifact_path)

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        """A matplotlib figure saved as `artifact_file` (format from its extension, e.g. .png)."""
        self._client.log_figure(self.run_id, fig, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """End the run and any child still open, with `status`. A second call does nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self._ended:
            return
        for sub in self._children:
            sub.end(status)
        self._client.set_terminated(self.run_id, status)
        self._ended = True

    def ui_hint(self) -> str:
        """How to look at this run in the MLflow UI."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        scheme = urlparse(self.tracking_uri).scheme
        if scheme in ("http", "https"):
            return f"open {self.tracking_uri.rstrip('/')}/{page}"
        return (
            f"mlflow ui --backend-store-uri {self.tracking_uri}\n"
            f"then open http://127.0.0.1:5000/{page}"
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.end(status)
        except Exception:
            # The job's own error matters more than a tracking server that went away meanwhile.
            log.exception("could not mark MLflow run %s as %s", self.run_id, status)
        return False


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            # Another process of the same job created it between our look-up and create.
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} (id {found.experiment_id}) is deleted; restore it with "
            f"`mlflow experiments restore --experiment-id {found.experiment_id}` or set tracking.experiment"
        )
    return found.experiment_id


class NullTracker:
    """The `Tracker` interface doing nothing: tracking disabled, or no mlflow installed."""

    run_id = ""
    experiment_id = ""
    tracking_uri = ""
    run_name = ""

    def __init__(self) -> None:
        self.skipped_metrics: Counter[str] = Counter()

    def child(self, name: str, params: dict[str, Any] | None = None) -> NullTracker:
        return NullTracker()

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_model_dir(self, path: Path, artifact_path: str = "model") -> None:
        pass

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")

    def ui_hint(self) -> str:
        return "tracking is off (tracking.enabled: false, or mlflow is not installed)"

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


def make_tracker(
    cfg: TrackingConfig, output_dir: Path, run_name: str, params: dict[str, Any] | None = None
) -> Tracker | NullTracker:
    """A `Tracker`, or a `NullTracker` when tracking is disabled or mlflow is not installed (with a warning)."""
    if not cfg.enabled:
        return NullTracker()
    if importlib.util.find_spec("mlflow") is None:
        log.warning("mlflow is not installed: this run is not tracked (set tracking.enabled: false to silence)")
        return NullTracker()
    return Tracker(cfg, output_dir, run_name, params=params)


def plot_metric_curves(history: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """One subplot per metric (value against step), up to three in a row. Non-finite values leave gaps.

    Builds a bare `Figure` (Agg canvas), not pyplot: no global figure list to leak or share across threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(history)
    cols = max(1, min(3, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    if not names:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = sorted(((int(s), float(v)) for s, v in history[name]), key=lambda p: p[0])
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig
