"""The trainer's core as a plain script: data → SFT → evaluation in one process, without Ray or MLflow.

For a machine that has torch, transformers, DeepSpeed and pyarrow only (a GPU box with no network): the
data is written with the local (process pool) generators, the learner is a `learner.engine.Learner` in
this process, evaluation rolls out the validation problems with the transformers engine on the
learner's own weights, and metrics go to `output_dir/metrics.jsonl` and the console.

    python -m apr_ray.plain --config small --set sft.max_minutes=8

Same config files, same workspace layout, same SFT loop and ladder as `apr-ray sft`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from apr_ray.config import ConfigError, RunConfig, check_overrides_used, dump_config, load_config
from apr_ray.data import has_parquet
from apr_ray.workspace import Workspace, ensure_init_model


def local_data(cfg: RunConfig, ws: Workspace, workers: int) -> Path:
    """Problems and demonstrations under the workspace, written here without Ray when missing."""
    from apr_ray import data
    from apr_ray.tokenizer import build_tokenizer

    ws.check_data_settings(cfg)
    ws.record_data_settings(cfg)
    if not has_parquet(ws.problems):
        summary = data.generate_problem_data_local(ws.problems, cfg.data.split_sizes(), seed=cfg.seed,
                                                   problem=cfg.data.problems, workers=workers, overwrite=True)
        print(summary.report(), flush=True)
    demos = ws.demos(cfg.data.demos.kind)
    if not has_parquet(demos):
        summary = data.generate_demos_local(ws.problems, demos, split="train", config=cfg.data.demos,
                                            tokenizer=build_tokenizer(), workers=workers, overwrite=True)
        print(summary.report(), flush=True)
    return demos


def run(cfg: RunConfig, workers: int, progress: bool = True, model: Path | None = None) -> dict[str, float]:
    """SFT from `model` (a Hugging Face model directory; default: the config's freshly built model)."""
    from apr_ray.data import iter_sft_batches, read_problems
    from apr_ray.evaluation import Evaluator, evaluate_model
    from apr_ray.learner.engine import Learner
    from apr_ray.sft import epochs, run_sft
    from apr_ray.tokenizer import build_tokenizer

    ws = Workspace(cfg.output_dir)
    ws.root.mkdir(parents=True, exist_ok=True)
    (ws.root / "config.yaml").write_text(dump_config(cfg))
    from apr_ray.console import route_third_party_logs

    if route_third_party_logs(ws.log_file):
        print(f"library logs and warnings (transformers, DeepSpeed): {ws.log_file}", flush=True)
    t0 = time.perf_counter()
    demos = local_data(cfg, ws, workers)
    model_dir = model or ensure_init_model(cfg, ws)
    tokenizer = build_tokenizer()
    problems = read_problems(ws.problems, cfg.eval.split)[: cfg.eval.problems]
    evaluator = Evaluator(problems, tokenizer, cfg.protocol, cfg.rollout.runtime, cfg.eval.sampling,
                          max_concurrent_trees=cfg.rollout.pool.max_concurrent_trees,
                          sampled_problems=cfg.eval.sampled_problems, samples_per_problem=cfg.eval.samples_per_problem,
                          sampled_seed=cfg.seed)
    learner = Learner(cfg.sft.learner, model_dir)

    def log(metrics: dict[str, float], step: int) -> None:
        ws.append_metrics(metrics, step)
        if any(k.startswith("val/") for k in metrics):
            print(f"[step {step}] " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)

    evals: dict[int, dict[str, float]] = {}

    def evaluate(step: int) -> dict[str, float]:
        result = evaluate_model(evaluator, learner.module, max_batch_size=cfg.rollout.engine.max_num_seqs)
        metrics = {f"val/{k}": v for k, v in result.metrics.items()}
        log(metrics, step)
        evals[step] = result.metrics
        ws.eval_dir.mkdir(parents=True, exist_ok=True)
        from apr_ray.types import tree_to_dict

        trees = [tree_to_dict(t) for t in result.trees[: max(cfg.eval.sample_trees, 1)]]
        (ws.eval_dir / f"sft_step{step}_trees.json").write_text(json.dumps(trees))
        return metrics

    def checkpoint(step: int) -> None:
        learner.save_checkpoint(ws.checkpoints("sft"), {"sft_step": step})

    batches = epochs(lambda e: iter_sft_batches(demos, cfg.sft.batch_sequences, shuffle_buffer=cfg.sft.shuffle_buffer,
                                                seed=cfg.seed + e))
    if cfg.sft.steps == 0:  # nothing to train: evaluate the model as it is (an untrained one only babbles)
        evaluate(0)
    result = run_sft(cfg.sft, learner, batches, log=log, evaluate=evaluate, checkpoint=checkpoint, progress=progress)
    learner.export_hf(ws.model("sft"))
    summary = {
        "sft_steps": result.steps,
        "sft_tokens": result.tokens,
        "sft_train_s": result.train_s,
        "sft_eval_s": result.eval_s,
        "wall_s": time.perf_counter() - t0,
        "interrupted": result.interrupted,
        "evaluations": {str(k): v for k, v in sorted(evals.items())},
    }
    (ws.root / "plain_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apr_ray.plain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="preset name or YAML file (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", type=Path, default=None, help="start SFT from this model directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the data")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_overrides_used("plain", args.overrides, model=args.model)
        if args.model is not None and not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: not a model directory (no config.json)")
        summary = run(cfg, args.workers, progress=not args.no_progress, model=args.model)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last = summary["evaluations"][max(summary["evaluations"], key=int)] if summary["evaluations"] else {}
    print(json.dumps({k: v for k, v in summary.items() if k != "evaluations"} | {"final": last}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
