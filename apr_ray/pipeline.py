"""The job: data → SFT → GRPO → evaluation on Ray, tracked in MLflow. What `apr-ray run|sft|grpo|eval` call.

Owns the order of the stages, the hand-over between them (the model directory each stage starts from),
what goes to MLflow (one pipeline run, one nested run per stage: params = the resolved config, metrics per
step, artifacts = the config, sample trees as JSON and HTML, evaluation plots, the final model) and the
closing summary. The stages' work is elsewhere: `data` (datasets), `sft.run_sft` (the SFT loop),
`trainer.GRPOTrainer` (the GRPO loop and the generator pool), `evaluation` (ladder metrics).

Ctrl-C: the stage in progress stops after its current step, checkpoints, and the MLflow runs end KILLED.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apr_ray.config import ConfigError, RunConfig, dump_config
from apr_ray.evaluation import LADDER_KEYS, EvalResult, Evaluator, paired_difference
from apr_ray.data import has_parquet
from apr_ray.sweep import markdown_table
from apr_ray.workspace import Workspace, ensure_init_model

STAGES = ("data", "sft", "grpo", "eval")


class Interrupted(Exception):
    """A stage was stopped with Ctrl-C (after checkpointing)."""


def ray_init(num_cpus: int | None = None) -> None:
    """Join the cluster when running under `ray job submit` (RAY_ADDRESS set), else start a local Ray."""
    import os

    import ray

    from apr_ray.console import reroute

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
    else:
        # Logical CPUs above the core count: Ray Data's read tasks must find a CPU while the map
        # actors hold theirs, or a 2-core machine deadlocks with both cores reserved by actors.
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data  # noqa: F401  (configures its loggers on import: route them with the rest)

    reroute()


def data_stage(cfg: RunConfig, ws: Workspace, progress: bool = True, demos: bool = True) -> None:
    """Problems (and, with `demos`, the demonstrations) for `cfg` in the workspace, reused when a previous
    command wrote them with the same data settings (data/config.yaml, `Workspace.check_data_settings`)."""
    from apr_ray import data
    from apr_ray.tokenizer import build_tokenizer

    demos_dir = ws.demos(cfg.data.demos.kind)
    ws.check_data_settings(cfg)
    ws.record_data_settings(cfg)
    ray_init()
    if not has_parquet(ws.problems):
        summary = data.generate_problem_data(ws.problems, cfg.data.split_sizes(), seed=cfg.seed,
                                             problem=cfg.data.problems, workers=cfg.data.num_workers,
                                             progress=progress)
        print(summary.report())
    else:
        print(f"problems: reusing {ws.problems} ({data.count_problems(ws.problems)})")
    if not demos:
        return
    if not has_parquet(demos_dir):
        summary = data.generate_demos(ws.problems, demos_dir, split="train", config=cfg.data.demos,
                                      tokenizer=build_tokenizer(), workers=cfg.data.num_workers, progress=progress)
        print(summary.report())
    else:
        print(f"demos: reusing {demos_dir}\n{data.summarize_demos(demos_dir, cfg.data.demos.kind).report()}")


def make_evaluator(cfg: RunConfig, ws: Workspace, split: str | None = None) -> Evaluator:
    from apr_ray.data import read_problems
    from apr_ray.tokenizer import build_tokenizer

    split = split or cfg.eval.split
    if not has_parquet(ws.problems):
        raise FileNotFoundError(f"{ws.problems}: no problems dataset (run `apr-ray run`, or the data stage, first)")
    problems = read_problems(ws.problems, split)[: cfg.eval.problems]
    return Evaluator(problems, build_tokenizer(), cfg.protocol, cfg.rollout.runtime, cfg.eval.sampling,
                     max_concurrent_trees=cfg.rollout.pool.max_concurrent_trees,
                     sampled_problems=cfg.eval.sampled_problems if split == cfg.eval.split else 0,
                     samples_per_problem=cfg.eval.samples_per_problem, sampled_seed=cfg.seed)


@dataclass
class PipelineReport:
    """What the closing summary prints."""

    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> eval metrics
    solved: dict[str, list[bool]] = field(default_factory=dict)  # label -> greedy correct, problem by problem
    stage_s: dict[str, float] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)  # GRPO phase totals
    grpo_steps: tuple[int, int] = (0, 0)  # (steps with a non-empty update, steps)
    model_dir: str = ""
    tracking_hint: str = ""
    interrupted: bool = False


class Pipeline:
    def __init__(self, cfg: RunConfig, progress: bool = True, resume: bool = False) -> None:
        """`resume`: the GRPO stage continues from the latest checkpoint under output_dir/grpo/checkpoints."""
        from apr_ray.tracking import flatten, make_tracker

        self.cfg, self.progress, self.resume = cfg, progress, resume
        self.ws = Workspace(cfg.output_dir)
        self.ws.check_data_settings(cfg)  # a refused workspace leaves no MLflow run behind
        self.ws.root.mkdir(parents=True, exist_ok=True)
        import ray  # noqa: F401  (sets up its loggers on import: route them after that)

        from apr_ray.console import route_third_party_logs

        if route_third_party_logs(self.ws.log_file):
            print(f"library logs and warnings (Ray, Ray Data, transformers, DeepSpeed, MLflow): {self.ws.log_file}",
                  flush=True)
        (self.ws.root / "config.yaml").write_text(dump_config(cfg))
        self.tracker = make_tracker(cfg.tracking, self.ws.root.resolve(), cfg.name,
                                    params=flatten(cfg.model_dump(mode="json")))
        self.tracker.log_text(dump_config(cfg), "config.yaml")
        from apr_ray.telemetry import RayMetrics

        # The same numbers as live Ray metrics (Prometheus → dashboards/apr-ray.json).
        self.live = RayMetrics(getattr(self.tracker, "run_name", "") or cfg.name)
        self.report = PipelineReport(tracking_hint=self.tracker.ui_hint())
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._pool_future: Any = None  # Future[GeneratorPool], started by the first stage that needs it

    # ------------------------------------------------------------------ helpers

    def _logger(self, tracker: Any, stage: str, offset: int = 0):
        """A stage's metric sink: its own run at the stage's step; the pipeline run, metrics.jsonl and the
        ladder plot at `offset` + step, once each, so the whole job shares one x axis (SFT steps, then
        GRPO steps after them)."""

        def log(metrics: dict[str, float], step: int) -> None:
            tracker.log_metrics(metrics, step)
            self.tracker.log_metrics(metrics, step + offset)
            self.ws.append_metrics(metrics, step + offset)
            self.live.publish(metrics, stage)
            for k, v in metrics.items():
                if k.startswith("val/") and k[4:] in (*LADDER_KEYS, "sampled_solved"):
                    self.history.setdefault(k, []).append((step + offset, float(v)))

        return log

    def _log_eval_artifacts(self, tracker: Any, label: str, result: EvalResult, decode: Any) -> None:
        """Sample trees as JSON and as HTML pages (the `apr-ray view` page) under trees/<label>/."""
        from apr_ray.types import tree_to_dict
        from apr_ray.viz import render_tree_html

        out = self.ws.eval_dir / label
        out.mkdir(parents=True, exist_ok=True)
        samples = result.trees[: self.cfg.eval.sample_trees]
        (out / "trees.json").write_text(json.dumps([tree_to_dict(t) for t in samples]))
        for i, tree in enumerate(samples):
            (out / f"tree{i}.html").write_text(render_tree_html(tree, decode))
        (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
        tracker.log_artifact(out, f"trees/{label}")

    def _plot(self, tracker: Any) -> None:
        from apr_ray.tracking import plot_metric_curves

        if self.history:
            fig = plot_metric_curves(self.history, f"{self.cfg.name}: validation ladder")
            self.ws.eval_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.ws.eval_dir / "ladder.png")
            tracker.log_figure(fig, "plots/ladder.png")

    # ------------------------------------------------------------------ stages

    def sft(self, model_dir: Path) -> Path:
        """SFT on a Ray learner group from `model_dir`; returns the exported model directory."""
        from apr_ray.data import iter_sft_stream_epoch
        from apr_ray.learner.actor import LearnerGroup
        from apr_ray.sft import epochs, run_sft
        from apr_ray.weight_sync import ObjectStoreTransport

        cfg = self.cfg
        demos = self.ws.demos(cfg.data.demos.kind)
        if not has_parquet(demos):
            raise FileNotFoundError(f"{demos}: no demonstrations (run the data stage first: `apr-ray run`)")
        tracker = self.tracker.child("sft")
        log = self._logger(tracker, "sft")
        evaluator = make_evaluator(cfg, self.ws)
        res = cfg.learners
        learner = LearnerGroup(cfg.sft.learner, model_dir, num_learners=res.num_learners,
                               num_cpus_per_learner=res.cpus_per_learner, num_gpus_per_learner=res.gpus_per_learner)
        self._start_pool(model_dir)  # starts while SFT trains; serves the evaluations
        transport = ObjectStoreTransport()

        def evaluate(step: int) -> None:
            handle = learner.publish_weights(transport, step)
            self._pool().sync_weights(handle)
            result = evaluator.run_pool(self._pool())
            log({f"val/{k}": v for k, v in result.metrics.items()}, step)
            print(f"[sft step {step}] {result.line()}", flush=True)
            self.report.evaluations["after SFT"] = result.metrics
            self.report.solved["after SFT"] = [t.correct for t in result.trees]
            if step == cfg.sft.steps:
                self._log_eval_artifacts(tracker, f"sft_step{step}", result, evaluator.decode)

        def checkpoint(step: int) -> None:
            learner.save_checkpoint(self.ws.checkpoints("sft"), {"sft_step": step})

        batches = epochs(lambda e: iter_sft_stream_epoch(demos, cfg.sft.batch_sequences,
                                                         shuffle_buffer=cfg.sft.shuffle_buffer, seed=cfg.seed + e))
        start = time.perf_counter()
        try:
            result = run_sft(cfg.sft, learner, batches, log=log, evaluate=evaluate, checkpoint=checkpoint,
                             progress=self.progress)
            out = Path(learner.export_hf(self.ws.model("sft")))
            if not result.interrupted:  # the pool serves the exported weights (the last evaluation synced them)
                self._pool().rebase(str(out), result.steps)
        finally:
            learner.shutdown()
        self.report.stage_s["sft"] = time.perf_counter() - start
        tracker.log_metrics({"sft/wall_s": result.wall_s, "sft/train_s": result.train_s, "sft/eval_s": result.eval_s},
                            result.steps)
        return self._end_stage(tracker, "sft", result, out)

    def grpo(self, model_dir: Path) -> Path:
        from apr_ray.trainer import GRPOTrainer

        cfg = self.cfg
        tracker = self.tracker.child("grpo")
        evaluator = make_evaluator(cfg, self.ws)
        offset = cfg.sft.steps  # GRPO steps follow SFT steps on the pipeline run's x axis

        baseline = "after SFT" not in self.report.evaluations  # `apr-ray grpo` from a model dir

        def on_eval(step: int, result: EvalResult) -> None:
            print(f"[grpo step {step}] {result.line()}", flush=True)
            label = "after SFT" if step == 0 else "after GRPO"
            self.report.evaluations[label] = result.metrics
            self.report.solved[label] = [t.correct for t in result.trees]
            if step == cfg.grpo.steps:
                self._log_eval_artifacts(tracker, f"grpo_step{step}", result, evaluator.decode)

        start = time.perf_counter()
        if self._pool_future is None:
            self._start_pool(model_dir)
        trainer = GRPOTrainer(cfg, str(model_dir), self._pool(), problems_dir=self.ws.problems,
                              checkpoint_dir=self.ws.checkpoints("grpo"), evaluator=evaluator,
                              log=self._logger(tracker, "grpo", offset),
                              on_eval=on_eval, progress=self.progress)
        try:
            result = trainer.run(evaluate_first=baseline and not self.resume, resume=self.resume)
            out = Path(trainer.export(self.ws.model("grpo")))
            if "eval" in self.stages:  # the test-split evaluation reuses the pool
                self.evaluate_on_pool()
        finally:
            trainer.shutdown()
        self.report.stage_s["grpo"] = time.perf_counter() - start
        self.report.phase_s = result.phase_s
        self.report.grpo_steps = (result.nonempty_steps, result.steps)
        return self._end_stage(tracker, "grpo", result, out)

    def _end_stage(self, tracker: Any, stage: str, result: Any, out: Path) -> Path:
        """Close the stage's run; an interrupted stage stops the job (its checkpoint is written)."""
        if result.interrupted:
            tracker.end("KILLED")
            then = "; `apr-ray grpo --resume` continues from it" if stage == "grpo" else ""
            raise Interrupted(f"{stage.upper()} stopped at step {result.steps}; checkpoint in "
                              f"{self.ws.checkpoints(stage)}{then}")
        tracker.end()
        return out

    def _start_pool(self, model_dir: Path) -> None:
        """Start the job's generator pool serving `model_dir`, in the background (a vLLM engine takes
        ~40 s to start on CPU; SFT trains meanwhile). One pool serves the whole job: SFT evaluations,
        GRPO rollouts, the test evaluation."""
        from concurrent.futures import ThreadPoolExecutor

        from apr_ray.pool import GeneratorPool
        from apr_ray.rollout.generator import GeneratorConfig

        cfg = self.cfg
        gen_cfg = GeneratorConfig(engine=cfg.rollout.engine.model_copy(update={"model": str(model_dir)}),
                                  backend=cfg.rollout.backend, runtime=cfg.rollout.runtime, protocol=cfg.protocol,
                                  max_concurrent_trees=cfg.rollout.pool.max_concurrent_trees)
        self._pool_future = ThreadPoolExecutor(1, thread_name_prefix="pool-start").submit(
            GeneratorPool, gen_cfg, cfg.rollout.pool)

    def _pool(self) -> Any:
        return self._pool_future.result()

    def evaluate_on_pool(self, split: str = "test") -> EvalResult:
        """Evaluate the pool's model on `split`: the job's closing test evaluation, or `apr-ray eval`'s."""
        evaluator = make_evaluator(self.cfg, self.ws, split=split)
        tracker = self.tracker.child("eval")
        start = time.perf_counter()
        result = evaluator.run_pool(self._pool())
        tracker.log_metrics({f"{split}/{k}": v for k, v in result.metrics.items()}, 0)
        self.tracker.log_metrics({f"{split}/{k}": v for k, v in result.metrics.items()}, 0)
        self._log_eval_artifacts(tracker, split, result, evaluator.decode)
        tracker.end()
        self.report.evaluations[split] = result.metrics
        self.report.stage_s["eval"] = time.perf_counter() - start
        print(f"[{split}] {result.line()}", flush=True)
        return result

    def evaluate_model_dir(self, model_dir: Path) -> EvalResult:
        """Evaluate `model_dir` on eval.split (`apr-ray eval`)."""
        split = self.cfg.eval.split
        make_evaluator(self.cfg, self.ws, split=split)  # a missing dataset fails before any engine starts
        if self._pool_future is None:
            self._start_pool(model_dir)
        return self.evaluate_on_pool(split)

    def sweep(self, model_dir: Path, baseline_dir: Path | None = None) -> dict[str, list[dict[str, Any]]]:
        """`apr-ray eval --sweep`: the context-window, total-tokens and latency curves of `model_dir` (and of
        the serial SoS+ model `baseline_dir`) on eval.split, in this process on the transformers engine.
        Tables (CSV, Markdown) and plots (PNG) under eval/sweep/, logged to the eval run in MLflow."""
        from apr_ray.data import read_problems
        from apr_ray.sweep import Sweep, SweptModel, write_sweep
        from apr_ray.tokenizer import build_tokenizer

        cfg = self.cfg
        if baseline_dir is not None and cfg.protocol != "apr":
            raise ConfigError(f"--baseline is the serial model an APR --model is compared with, but this config "
                              f"trains {cfg.protocol!r} (data.demos.kind): sweep it alone with --model")
        tokenizer = build_tokenizer()
        sweep = Sweep(cfg.eval.sweep, read_problems(self.ws.problems, cfg.eval.split), tokenizer, cfg.rollout.runtime)
        label = {"apr": "APR", "sosp": "SoS+"}
        models = [SweptModel(label[cfg.protocol], cfg.protocol, self._local_engine(model_dir, tokenizer))]
        if baseline_dir is not None:
            models.append(SweptModel(label["sosp"], "sosp", self._local_engine(baseline_dir, tokenizer)))
        start = time.perf_counter()
        tables = sweep.run(models)
        out = self.ws.eval_dir / "sweep"
        write_sweep(tables, out, f"{cfg.name}, {cfg.eval.split} split")
        tracker = self.tracker.child("eval")
        tracker.log_artifact(out, "eval/sweep")
        tracker.end()
        self.tracker.log_artifact(out, "eval/sweep")
        self.report.stage_s["sweep"] = time.perf_counter() - start
        for name, rows in tables.items():
            print(f"\n{name} ({out / name}.csv)\n" + markdown_table(rows), flush=True)
        return tables

    def _local_engine(self, model_dir: Path, tokenizer: Any) -> Any:
        from transformers import AutoModelForCausalLM

        from apr_ray.rollout.transformers_engine import TransformersEngine

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        windows = self.cfg.eval.sweep.windows
        if max(windows) > model.config.max_position_embeddings:
            raise ConfigError(f"eval.sweep.windows reach {max(windows)} tokens, but {model_dir} attends to "
                              f"{model.config.max_position_embeddings} positions (max_position_embeddings)")
        return TransformersEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    # ------------------------------------------------------------------ the whole job

    def run(self, stages: tuple[str, ...] = STAGES, model_dir: Path | None = None,
            baseline_dir: Path | None = None) -> PipelineReport:
        self.stages = stages
        status = "FINISHED"
        try:
            if "data" in stages:
                start = time.perf_counter()
                data_stage(self.cfg, self.ws, self.progress, demos="sft" in stages)
                self.report.stage_s["data"] = time.perf_counter() - start
            ray_init()
            model = model_dir or ensure_init_model(self.cfg, self.ws)
            if "sft" in stages and self.cfg.sft.steps > 0:
                model = self.sft(model)
            if "grpo" in stages and self.cfg.grpo.steps > 0:
                model = self.grpo(model)
            elif "eval" in stages:
                self.evaluate_model_dir(model)
            elif "sweep" in stages:
                self.sweep(model, baseline_dir)
            self.report.model_dir = str(model)
            if model != self.ws.init_model:
                self.tracker.log_model_dir(Path(model), "model")
        except (Interrupted, KeyboardInterrupt) as err:
            status, self.report.interrupted = "KILLED", True
            print(f"\ninterrupted: {err}" if str(err) else "\ninterrupted")
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if self._pool_future is not None:
                self._pool_future.cancel()
                if self._pool_future.done() and self._pool_future.exception() is None:
                    self._pool_future.result().shutdown()
            self._plot(self.tracker)
            (self.ws.root / "summary.json").write_text(json.dumps(self.report.__dict__, indent=1, default=str))
            self.tracker.log_artifact(self.ws.root / "summary.json")
            self.tracker.end(status)
        return self.report


def summary_table(report: PipelineReport) -> str:
    """The closing table: the ladder before / after each stage, time per stage and the MLflow pointer."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    rows = list(LADDER_KEYS) + ["sampled_solved", "tokens_total_mean", "tokens_critical_path_mean", "threads_per_tree"]
    table = Table(title="apr-ray: validation ladder (greedy)")
    table.add_column("metric")
    for label in report.evaluations:
        table.add_column(label, justify="right")
    for key in rows:
        cells = []
        for metrics in report.evaluations.values():
            v = metrics.get(key)
            cells.append("-" if v is None else (f"{v:.3f}" if key in LADDER_KEYS or "solved" in key else f"{v:.1f}"))
        table.add_row(key, *cells)
    buf = StringIO()
    console = Console(file=buf, width=110, force_terminal=False)
    if report.evaluations:  # a sweep has its own tables
        console.print(table)
    before, after = report.solved.get("after SFT"), report.solved.get("after GRPO")
    if before and after and len(before) == len(after):
        mean, lo, hi = paired_difference(before, after)
        console.print(f"GRPO - SFT, solved on the same {len(before)} problems: {100 * mean:+.1f} points "
                      f"(95% interval {100 * lo:+.1f} .. {100 * hi:+.1f})")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in report.stage_s.items())
    console.print(f"time: {times}")
    total = sum(report.phase_s.get(k, 0.0) for k in ("rollout", "train", "sync", "score", "problems"))
    if total > 0:
        shares = ", ".join(f"{k} {report.phase_s[k] / total:.0%}" for k in ("rollout", "train", "sync", "score"))
        console.print(f"GRPO step time: {shares}; non-empty updates in {report.grpo_steps[0]} of "
                      f"{report.grpo_steps[1]} steps")
    if report.model_dir:
        console.print(f"model: {report.model_dir}")
    console.print(f"MLflow: {report.tracking_hint}")
    return buf.getvalue()
