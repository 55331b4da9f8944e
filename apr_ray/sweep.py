"""Test-time scaling sweeps of one checkpoint, or of an APR and a serial (SoS+) one: the paper's three curves.

- context window (paper Fig. 4b): greedy accuracy when every request, so every thread, is bounded by a
  window of w tokens (prompt + output). APR at each child setting; SoS+ (one thread) truncated at the window.
- total tokens (Fig. 4a / 8): accuracy against the mean generated tokens per problem: the greedy point, and
  pass@n / cons@n of n samples at `temperature`, for each model and child setting.
- latency (Fig. 6): greedy wall-clock per problem with the problems run one at a time (a tree's children
  are still batched by the engine), beside accuracy and critical-path tokens.

A child setting c caps the children run per spawn at c (`children_as: cap`, for models trained without
the condition), prefixes the root with APR's `Sub Call Budget: c ` (`condition`, for models trained with
`data.demos.format.condition`), or both. Pure of Ray and MLflow: engines come in as `engines.Engine`s and
the pipeline logs what `write_sweep` writes.
"""

from __future__ import annotations

import asyncio
import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from apr_ray.countdown.problems import Problem
from apr_ray.evaluation import roll_out
from apr_ray.rollout.engines import Engine, SamplingConfig
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.types import EndReason, TreeRecord

TABLES = ("context", "tokens", "latency")


class SweepConfig(BaseModel):
    """What `apr-ray eval --sweep` measures. Defaults: the tiny preset's scale (CPU, minutes)."""

    model_config = ConfigDict(extra="forbid")

    problems: int = Field(100, ge=1, description="the first this many problems of eval.split are swept")
    windows: list[int] = Field([128, 192, 256, 384, 512, 768], min_length=1,
                               description="context windows of the context-window curve (tokens per request)")
    children: list[int] = Field([1, 2, 4, 8], min_length=1, description="APR child settings (see children_as)")
    children_as: Literal["cap", "condition", "both"] = Field(
        "cap", description="a child setting c caps the children per spawn at c (cap), prefixes the root with "
        "'Sub Call Budget: c ' (condition: models trained with data.demos.format.condition), or both")
    sosp_budgets: list[int | None] = Field(
        [None], min_length=1, description="SoS+ settings: the 'Token Budget: B ' condition (null: none)")
    samples: list[int] = Field([1, 2, 4, 8], min_length=1, description="n of pass@n and cons@n")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the pass@n / cons@n samples")
    latency_problems: int = Field(20, ge=1, description="problems (the first ones) timed one at a time")
    max_concurrent_trees: int = Field(64, ge=1, description="trees in flight in the batched sweeps")

    @field_validator("windows", "children", "samples")
    @classmethod
    def _positive_increasing(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or values != sorted(set(values)):
            raise ValueError(f"must be positive and strictly increasing, got {values}")
        return values


@dataclass
class SweptModel:
    label: str  # how tables and plots name it ("APR", "SoS+")
    protocol: str  # apr | sosp
    engine: Engine


def settings(protocol: str, cfg: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """(label, RuntimeConfig update) of each setting a model of `protocol` is swept at."""
    if protocol == "sosp":
        return [("no budget" if b is None else f"budget {b}", {"budget": b}) for b in cfg.sosp_budgets]
    out = []
    for c in cfg.children:
        update: dict[str, Any] = {}
        if cfg.children_as in ("cap", "both"):
            update["max_children"] = c
        if cfg.children_as in ("condition", "both"):
            update["budget"] = c
        out.append((f"{c} child" + ("" if c == 1 else "ren"), update))
    return out


def pass_at(groups: Sequence[Sequence[TreeRecord]], n: int) -> float:
    """Share of problems with a correct tree among their first n samples."""
    return sum(any(t.correct for t in g[:n]) for g in groups) / len(groups)


def cons_at(groups: Sequence[Sequence[TreeRecord]], n: int) -> float:
    """Share of problems whose majority answer over their first n samples is correct. Samples that reached
    no answer do not vote; a tie goes to the answer reached first; no answer at all counts as wrong."""
    solved = 0
    for g in groups:
        answered = [t for t in g[:n] if t.final_answer is not None]
        if not answered:
            continue
        votes = Counter(t.final_answer for t in answered)
        top = max(votes.values())
        winner = next(t for t in answered if votes[t.final_answer] == top)
        solved += winner.correct
    return solved / len(groups)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _solved(trees: Sequence[TreeRecord]) -> float:
    return _mean([float(t.correct) for t in trees])


class Sweep:
    """Runs the three sweeps for each model on the same problems; rows are plain dicts (the CSV rows)."""

    def __init__(self, cfg: SweepConfig, problems: Sequence[Problem], tokenizer: Any, runtime: RuntimeConfig,
                 progress: Any = print) -> None:
        if len(problems) < cfg.problems:
            raise ValueError(f"eval.sweep.problems = {cfg.problems}, but the evaluated split holds {len(problems)} "
                             "problems (data.val_problems / data.test_problems)")
        self.cfg, self.tokenizer, self.progress = cfg, tokenizer, progress
        self.problems = list(problems[: cfg.problems])
        self.runtime = runtime.model_copy(update={"sampling": SamplingConfig(temperature=0.0)})

    def _trees(self, model: SweptModel, runtime: RuntimeConfig, problems: Sequence[Problem], k: int = 1,
               concurrent: int | None = None) -> list[TreeRecord]:
        return asyncio.run(roll_out(model.engine, self.tokenizer, model.protocol, runtime, problems, k,
                                    concurrent or self.cfg.max_concurrent_trees))

    def context(self, model: SweptModel) -> list[dict[str, Any]]:
        rows = []
        for setting, update in settings(model.protocol, self.cfg):
            for window in self.cfg.windows:
                runtime = self.runtime.model_copy(
                    update={**update, "context_window": window, "max_tokens": min(self.runtime.max_tokens, window)})
                trees = self._trees(model, runtime, self.problems)
                rows.append({
                    "model": model.label, "setting": setting, "window": window, "problems": len(trees),
                    "solved": _solved(trees),
                    "stopped_by_window": _mean([float(any(th.end_reason == EndReason.CONTEXT for th in t.threads))
                                                for t in trees]),
                    "tokens_total_mean": _mean([t.metrics.tokens_total for t in trees]),
                    "tokens_critical_path_mean": _mean([t.metrics.tokens_critical_path for t in trees]),
                })
                self.progress(f"sweep context: {model.label} {setting} window {window}: solved {rows[-1]['solved']:.3f}")
        return rows

    def tokens(self, model: SweptModel) -> list[dict[str, Any]]:
        rows = []
        n_max = max(self.cfg.samples)
        sampled = self.runtime.model_copy(update={"sampling": SamplingConfig(temperature=self.cfg.temperature)})
        for setting, update in settings(model.protocol, self.cfg):
            greedy = self._trees(model, self.runtime.model_copy(update=update), self.problems)
            greedy_solved = _solved(greedy)
            rows.append({"model": model.label, "setting": setting, "metric": "greedy", "n": 1,
                         "accuracy": greedy_solved,
                         "tokens_per_problem": _mean([t.metrics.tokens_total for t in greedy])})
            trees = self._trees(model, sampled.model_copy(update=update), self.problems, k=n_max)
            groups = [trees[i : i + n_max] for i in range(0, len(trees), n_max)]
            for n in self.cfg.samples:
                tokens = _mean([sum(t.metrics.tokens_total for t in g[:n]) for g in groups])
                for metric, score in (("pass", pass_at), ("cons", cons_at)):
                    rows.append({"model": model.label, "setting": setting, "metric": f"{metric}@n", "n": n,
                                 "accuracy": score(groups, n), "tokens_per_problem": tokens})
            self.progress(f"sweep tokens: {model.label} {setting}: greedy {greedy_solved:.3f}, "
                          f"pass@{n_max} {pass_at(groups, n_max):.3f}, cons@{n_max} {cons_at(groups, n_max):.3f}")
        return rows

    def latency(self, model: SweptModel) -> list[dict[str, Any]]:
        rows = []
        problems = self.problems[: self.cfg.latency_problems]
        for setting, update in settings(model.protocol, self.cfg):
            trees = self._trees(model, self.runtime.model_copy(update=update), problems, concurrent=1)
            walls = [t.metrics.wall_s for t in trees]
            rows.append({
                "model": model.label, "setting": setting, "problems": len(trees), "solved": _solved(trees),
                "latency_s_mean": _mean(walls), "latency_s_p50": _quantile(walls, 0.5),
                "latency_s_p90": _quantile(walls, 0.9),
                "tokens_critical_path_mean": _mean([t.metrics.tokens_critical_path for t in trees]),
                "tokens_total_mean": _mean([t.metrics.tokens_total for t in trees]),
            })
            self.progress(f"sweep latency: {model.label} {setting}: {rows[-1]['latency_s_mean']:.3f} s per problem, "
                          f"solved {rows[-1]['solved']:.3f}")
        return rows

    def run(self, models: Sequence[SweptModel]) -> dict[str, list[dict[str, Any]]]:
        tables: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
        for model in models:
            for name in TABLES:
                tables[name] += getattr(self, name)(model)
        return tables


# --- tables and plots ------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _lines(rows: Sequence[dict[str, Any]], *keys: str) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped into one plotted line per distinct value of `keys`, in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(", ".join(str(r[k]) for k in keys), []).append(r)
    return out


def plot(name: str, rows: Sequence[dict[str, Any]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if name == "context":
        for label, line in _lines(rows, "model", "setting").items():
            ax.plot([r["window"] for r in line], [r["solved"] for r in line], marker="o", label=label)
        ax.set_xlabel("context window (tokens per request)")
        ax.set_ylabel("solved (greedy)")
    elif name == "tokens":
        for label, line in _lines([r for r in rows if r["metric"] != "greedy"], "model", "setting", "metric").items():
            ax.plot([r["tokens_per_problem"] for r in line], [r["accuracy"] for r in line], marker="o",
                    linestyle="-" if "pass" in label else "--", label=label)
        greedy = [r for r in rows if r["metric"] == "greedy"]
        ax.scatter([r["tokens_per_problem"] for r in greedy], [r["accuracy"] for r in greedy], marker="*", s=120,
                   color="black", label="greedy", zorder=3)
        for r in greedy:
            ax.annotate(f"{r['model']}, {r['setting']}", (r["tokens_per_problem"], r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per problem (mean)")
        ax.set_ylabel("accuracy")
    else:
        for label, line in _lines(rows, "model").items():
            ax.plot([r["latency_s_mean"] for r in line], [r["solved"] for r in line], marker="o", label=label)
            for r in line:
                ax.annotate(r["setting"], (r["latency_s_mean"], r["solved"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("wall-clock per problem, one at a time (s)")
        ax.set_ylabel("solved (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def write_sweep(tables: dict[str, list[dict[str, Any]]], out_dir: Path, title: str) -> list[Path]:
    """Each table as <name>.csv, <name>.md and <name>.png under `out_dir`; the paths written."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        if not rows:
            continue
        with open(out_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out_dir / f"{name}.md").write_text(markdown_table(rows))
        fig = plot(name, rows, f"{title}: {name}")
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written += [out_dir / f"{name}.{ext}" for ext in ("csv", "md", "png")]
    return written
