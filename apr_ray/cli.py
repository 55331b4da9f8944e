"""`apr-ray`: the command line. Parses arguments, validates the config, then imports what the command
needs (Ray, torch, transformers come after validation, so a typo fails in a second).

Every command's failure for a user-fixable reason (bad config, missing file, bad data) prints one clear
`error:` line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apr_ray.config import CONFIG_DIR, ConfigError, RunConfig, check_overrides_used, dump_config, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument("--config", default=None,
                        help=f"preset name ({presets}) or a YAML file; default: the built-in tiny preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.train_problems=500 (repeatable)")


def _ray_init() -> None:
    from apr_ray.pipeline import ray_init

    ray_init()


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_overrides_used("config show", args.overrides)
    print(dump_config(cfg), end="")
    return 0


def _default_model(cfg: RunConfig, command: str) -> Path | None:
    """The model `apr-ray grpo|eval` starts from when --model is not given: the latest stage's export."""
    from apr_ray.workspace import Workspace

    ws = Workspace(cfg.output_dir)
    for stage in ["grpo", "sft"] if command == "eval" else ["sft"]:
        if (ws.model(stage) / "config.json").is_file():
            return ws.model(stage)
    if command == "eval":
        raise FileNotFoundError(f"no trained model under {cfg.output_dir} (looked for grpo/model and sft/model); "
                                "pass --model DIR or run `apr-ray run` first")
    return None


def _run_stages(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    """Every stage command writes (or reuses) the data it needs first: `data` always leads `stages`."""
    from apr_ray.pipeline import Pipeline, summary_table
    from apr_ray.workspace import Workspace, latest_checkpoint

    cfg = load_config(args.config, args.overrides)
    check_overrides_used(args.command, args.overrides)
    model, baseline = getattr(args, "model", None), getattr(args, "baseline", None)
    for flag, path in (("--model", model), ("--baseline", baseline)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path}: not a model directory (no config.json)")
    if args.command in ("grpo", "eval"):
        model = model or _default_model(cfg, args.command)
        if model is None:
            print(f"note: no SFT model under {cfg.output_dir} (sft/model): GRPO starts from the untrained initial "
                  "model; pass --model DIR or run `apr-ray sft` first")
        check_overrides_used(args.command, args.overrides, model=model)
    resume = getattr(args, "resume", False)
    if resume and latest_checkpoint(Workspace(cfg.output_dir).checkpoints("grpo")) is None:
        raise FileNotFoundError(f"--resume: no GRPO checkpoint under {cfg.output_dir}/grpo/checkpoints; run without "
                                "--resume to start GRPO afresh")
    print(f"apr-ray {args.command}: preset {cfg.name}, stages {' → '.join(stages)}, output {cfg.output_dir}")
    pipeline = Pipeline(cfg, progress=not args.no_progress, resume=resume)
    report = pipeline.run(stages, model_dir=Path(model) if model else None,
                          baseline_dir=Path(baseline) if baseline else None)
    print(summary_table(report))
    return 130 if report.interrupted else 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run_stages(args, ("data", "sft", "grpo", "eval"))


def cmd_sft(args: argparse.Namespace) -> int:
    return _run_stages(args, ("data", "sft"))


def cmd_grpo(args: argparse.Namespace) -> int:
    return _run_stages(args, ("data", "grpo"))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.baseline is not None and not args.sweep:
        raise ValueError("--baseline compares a serial model with --model in a sweep: add --sweep")
    return _run_stages(args, ("data", "sweep") if args.sweep else ("data", "eval"))


def cmd_submit(args: argparse.Namespace) -> int:
    from apr_ray.submit import address, submit

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before anything is sent
    check_overrides_used(args.stage, args.overrides)
    if args.resume and args.stage != "grpo":
        raise ValueError(f"--resume continues a GRPO stage: use it with --stage grpo (not --stage {args.stage})")
    return submit(args.stage, args.config, args.overrides, addr=address(args.address), stack=args.stack,
                  follow=args.follow, name=cfg.name, resume=args.resume)


def cmd_data_problems(args: argparse.Namespace) -> int:
    from apr_ray import data

    cfg = load_config(args.config, args.overrides)
    check_overrides_used("data problems", args.overrides)
    _ray_init()
    summary = data.generate_problem_data(args.out, cfg.data.split_sizes(), seed=cfg.seed, problem=cfg.data.problems,
                                         workers=cfg.data.num_workers, overwrite=args.overwrite,
                                         progress=not args.no_progress)
    print(summary.report())
    return 0


def cmd_data_demos(args: argparse.Namespace) -> int:
    from apr_ray import data
    from apr_ray.tokenizer import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    check_overrides_used("data demos", args.overrides)
    if not args.problems.exists():
        raise FileNotFoundError(f"--problems {args.problems}: no such problems dataset (write one with `apr-ray data problems`)")
    _ray_init()
    summary = data.generate_demos(args.problems, args.out, split=args.split, config=cfg.data.demos,
                                  tokenizer=build_tokenizer(), limit=args.limit, workers=cfg.data.num_workers,
                                  overwrite=args.overwrite, progress=not args.no_progress)
    print(summary.report())
    return 0


def cmd_data_import_apr(args: argparse.Namespace) -> int:
    from apr_ray.apr_import import import_apr
    from apr_ray.tokenizer import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    check_overrides_used("data import-apr", args.overrides)
    summary = import_apr(args.file, args.out, build_tokenizer(), kind=args.kind, fmt=cfg.data.demos.format,
                         limit=args.limit, overwrite=args.overwrite, progress=not args.no_progress)
    print(summary.report())
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from apr_ray.viz import view_main

    page = view_main(args.tree, args.out, args.index, args.tokenizer)
    print(f"wrote {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apr-ray", description="Ray RL for Adaptive Parallel Reasoning")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, text in (
        ("run", cmd_run, "the whole job: data → SFT → GRPO → test evaluation, tracked in MLflow"),
        ("sft", cmd_sft, "data (reused when present) and SFT on the demonstrations"),
        ("grpo", cmd_grpo, "data (reused when present) and GRPO from --model (default: output_dir/sft/model)"),
        ("eval", cmd_eval, "data (reused when present) and evaluation of --model (default: the latest trained "
                           "model) on eval.split (val; --set eval.split=test for the held-out split)"),
    ):
        stage = sub.add_parser(name, help=text)
        _add_config_args(stage)
        stage.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name in ("grpo", "eval"):
            stage.add_argument("--model", type=Path, default=None, help="model directory (HF layout)")
        if name == "eval":
            stage.add_argument("--sweep", action="store_true",
                               help="the test-time curves instead of one evaluation: accuracy vs context window, "
                                    "vs generated tokens (pass@n, cons@n) and vs latency (eval.sweep.*), written "
                                    "under output_dir/eval/sweep and logged to MLflow")
            stage.add_argument("--baseline", type=Path, default=None,
                               help="with --sweep: a serial SoS+ model directory swept beside the APR --model")
        if name == "grpo":
            stage.add_argument("--resume", action="store_true",
                               help="continue from the latest checkpoint in output_dir/grpo/checkpoints (after a "
                                    "stop, a learner's death or a lost cluster): weights, optimizer, step and the "
                                    "problem order as an uninterrupted run")
        stage.set_defaults(func=func)

    submit = sub.add_parser("submit", help="run a stage command as a Ray job on a running cluster (Ray Jobs)")
    _add_config_args(submit)
    submit.add_argument("--stage", default="run", choices=["run", "sft", "grpo", "eval"],
                        help="the command the job runs (default: run)")
    submit.add_argument("--resume", action="store_true", help="with --stage grpo: the job continues from the "
                        "latest GRPO checkpoint of output_dir (which must be on storage the cluster shares)")
    submit.add_argument("--address", default=None, help="the cluster's dashboard address (default: $RAY_ADDRESS)")
    submit.add_argument("--stack", default="cpu", choices=["cpu", "gpu", "none"],
                        help="software the job installs: the CPU or CUDA vLLM stack, or none (the image has it)")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs and exit with its status (0 succeeded, 1 failed, 130 stopped)")
    submit.set_defaults(func=cmd_submit)

    config = sub.add_parser("config", help="inspect configurations")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved configuration as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="generate or import datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    problems = data_sub.add_parser("problems", help="problem splits as Parquet (sizes from data.*_problems)")
    problems.add_argument("--out", type=Path, required=True, help="output directory")
    demos = data_sub.add_parser("demos", help="tokenized solver demonstrations as Parquet")
    demos.add_argument("--problems", type=Path, required=True, help="a problems dataset directory")
    demos.add_argument("--out", type=Path, required=True, help="output directory")
    demos.add_argument("--split", default="train", choices=["train", "val", "test"])
    imp = data_sub.add_parser("import-apr", help="import the APR reference's demonstrations (JSON / JSON lines)")
    imp.add_argument("file", type=Path, help="reference-layout JSON list or JSON lines file")
    imp.add_argument("--out", type=Path, required=True, help="output directory")
    imp.add_argument("--kind", default="apr", choices=["apr", "sosp"], help="trace_dict (apr) or search_path (sosp)")
    for p, func in ((problems, cmd_data_problems), (demos, cmd_data_demos), (imp, cmd_data_import_apr)):
        _add_config_args(p)
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if p is not problems:
            p.add_argument("--limit", type=int, default=None, help="at most this many problems / records")
        p.set_defaults(func=func)

    view = sub.add_parser("view", help="render a thread tree (TREE.json) as a self-contained HTML page")
    view.add_argument("tree", type=Path, help="a tree record JSON file (one tree or a list)")
    view.add_argument("--out", type=Path, default=None, help="output page (default: next to the input)")
    view.add_argument("--index", type=int, default=0, help="which tree of a list")
    view.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: built in)")
    view.set_defaults(func=cmd_view)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
