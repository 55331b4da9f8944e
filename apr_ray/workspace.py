"""Where a run keeps its files: one directory per run (`output_dir`), the same layout for every command.

    output_dir/
      config.yaml                 the resolved config of the last command
      data/problems, data/demos-<kind>, data/config.yaml
      model/init                  the initial model (HF directory) built from `model`
      sft/checkpoints, sft/model  DeepSpeed checkpoints and the exported model after SFT
      grpo/checkpoints, grpo/model
      eval/                       evaluation trees (JSON + HTML) and plots
      metrics.jsonl               every logged metric (the plain script's record; MLflow holds them too)
      job.log                     the libraries' log records and warnings, when run without a terminal

Owns the layout and the initial model; imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from apr_ray.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def problems(self) -> Path:
        return self.root / "data" / "problems"

    def demos(self, kind: str) -> Path:
        return self.root / "data" / f"demos-{kind}"

    @property
    def data_record(self) -> Path:
        """The settings the data was written with (every entry point writes and checks it)."""
        return self.root / "data" / "config.yaml"

    def check_data_settings(self, cfg: RunConfig) -> None:
        """Refuse data written with other data settings, naming each setting that differs, so a changed
        config never trains or evaluates on stale data. Raises ConfigError before anything starts."""
        import yaml

        from apr_ray.data import has_parquet
        from apr_ray.tracking import flatten

        written = [d for d in (self.problems, self.demos(cfg.data.demos.kind)) if has_parquet(d)]
        if not written:
            return
        hint = (f"choose another output_dir (--set output_dir=...), set these back, or delete {self.root / 'data'}")
        if not self.data_record.is_file():
            raise ConfigError(f"{self.root / 'data'} holds data ({written[0].name}) but no record of the settings it "
                              f"was written with ({self.data_record} is missing); {hint}")
        previous = flatten(yaml.safe_load(self.data_record.read_text()) or {})
        wanted = flatten(data_settings(cfg))
        differ = [f"{key}: {previous.get(key, '(not set)')!r} there, {wanted.get(key, '(not set)')!r} here"
                  for key in sorted(previous.keys() | wanted.keys()) if previous.get(key) != wanted.get(key)]
        if differ:
            raise ConfigError(f"{self.root / 'data'} holds data written with other data settings (see "
                              f"{self.data_record}): {'; '.join(differ)}; {hint}")

    def record_data_settings(self, cfg: RunConfig) -> None:
        import yaml

        self.data_record.parent.mkdir(parents=True, exist_ok=True)
        self.data_record.write_text(yaml.safe_dump(data_settings(cfg), sort_keys=False))

    @property
    def init_model(self) -> Path:
        return self.root / "model" / "init"

    def checkpoints(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"

    def model(self, stage: str) -> Path:
        return self.root / stage / "model"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def log_file(self) -> Path:
        """The libraries' log records when the job runs without a terminal (apr_ray.console)."""
        return self.root / "job.log"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    def append_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One JSON line per call: {"step": N, "time": ..., metric: value}; non-finite values as null."""
        import time

        row = {"step": step, "time": time.time()}
        row |= {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint that DeepSpeed's `latest` file in `ckpt_dir` names; None when there is none."""
    latest = Path(ckpt_dir) / "latest"
    return Path(ckpt_dir) / latest.read_text().strip() if latest.is_file() else None


def data_settings(cfg: RunConfig) -> dict:
    """What the problems and demonstrations depend on: the run's seed and its data section (but not how many
    workers write them: the same settings give the same rows with any number)."""
    return {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json", exclude={"num_workers"})}


def ensure_init_model(cfg: RunConfig, ws: Workspace) -> Path:
    """The initial model directory for `cfg.model`, built once (the same config always builds the same
    weights) and rebuilt when the model config changed."""
    from apr_ray.modeling import init_model, save_pretrained
    from apr_ray.tokenizer import build_tokenizer

    record = ws.init_model / "apr_ray_model.json"
    wanted = cfg.model.model_dump(mode="json")
    if record.is_file() and json.loads(record.read_text()) == wanted and (ws.init_model / "config.json").is_file():
        return ws.init_model
    tokenizer = build_tokenizer()
    save_pretrained(init_model(cfg.model, tokenizer), tokenizer, ws.init_model)
    record.write_text(json.dumps(wanted, indent=1))
    return ws.init_model
