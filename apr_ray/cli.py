"""`apr-ray`: the command line. Parses arguments, validates the config, then imports what the command
needs (Ray, torch, transformers come after validation, so a typo fails in a second).

Every command's failure for a user-fixable reason (bad config, missing file, bad data) prints one clear
`error:` line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apr_ray.config import ConfigError, RunConfig, dump_config, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="preset name (tiny, small, paper, sosp) or a YAML file; "
                        "default: the built-in tiny preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.train_problems=500 (repeatable)")


def _ray_init(num_cpus: int | None = None) -> None:
    """Join the cluster when running under `ray job submit` (RAY_ADDRESS set), else start a local Ray."""
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
    else:
        # Logical CPUs above the core count: Ray Data's read tasks must find a CPU while the map
        # actors hold theirs, or a 2-core machine deadlocks with both cores reserved by actors.
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def _has_parquet(directory: Path) -> bool:
    return directory.is_dir() and any(directory.rglob("*.parquet"))


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0


def _data_stage(cfg: RunConfig, progress: bool = True) -> tuple[Path, Path]:
    """Problems and demonstrations for `cfg` under output_dir/data, reused when a previous run wrote
    them with the same data settings (kept in data/config.yaml); refused when the settings differ, so a
    changed config never trains on stale data."""
    import yaml

    from apr_ray import data
    from apr_ray.tokenizer import build_tokenizer

    root = cfg.output_dir / "data"
    problems_dir, demos_dir = root / "problems", root / f"demos-{cfg.data.demos.kind}"
    settings = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json")}
    record = root / "config.yaml"
    if _has_parquet(problems_dir) or _has_parquet(demos_dir):
        previous = yaml.safe_load(record.read_text()) if record.is_file() else None
        if previous != settings:
            raise ConfigError(
                f"{root} holds data written with other data settings (see {record}); "
                f"choose another output_dir (--set output_dir=...) or delete {root}"
            )
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(settings, sort_keys=False))
    _ray_init()
    if not _has_parquet(problems_dir):
        summary = data.generate_problem_data(problems_dir, cfg.data.split_sizes(), seed=cfg.seed,
                                             problem=cfg.data.problems, workers=cfg.data.num_workers,
                                             progress=progress)
        print(summary.report())
    else:
        print(f"problems: reusing {problems_dir} ({data.count_problems(problems_dir)})")
    if not _has_parquet(demos_dir):
        summary = data.generate_demos(problems_dir, demos_dir, split="train", config=cfg.data.demos,
                                      tokenizer=build_tokenizer(), workers=cfg.data.num_workers, progress=progress)
        print(summary.report())
    else:
        print(f"demos: reusing {demos_dir}\n{data.summarize_demos(demos_dir, cfg.data.demos.kind).report()}")
    return problems_dir, demos_dir


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "config.yaml").write_text(dump_config(cfg))
    print(f"apr-ray run: preset {cfg.name}, output {cfg.output_dir}")
    _data_stage(cfg, progress=not args.no_progress)
    return 0


def cmd_data_problems(args: argparse.Namespace) -> int:
    from apr_ray import data

    cfg = load_config(args.config, args.overrides)
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
    if not args.problems.exists():
        raise FileNotFoundError(f"--problems {args.problems}: no such problems dataset (write one with `apr-ray data problems`)")
    _ray_init()
    summary = data.generate_demos(args.problems, args.out, split=args.split, config=cfg.data.demos,
                                  tokenizer=build_tokenizer(), limit=args.limit, workers=cfg.data.num_workers,
                                  overwrite=args.overwrite, progress=not args.no_progress)
    print(summary.report())
    return 0


def cmd_data_import_apr(args: argparse.Namespace) -> int:
    from apr_ray import data
    from apr_ray.tokenizer import build_tokenizer

    cfg = load_config(args.config, args.overrides)
    summary = data.import_apr(args.file, args.out, build_tokenizer(), kind=args.kind, fmt=cfg.data.demos.format,
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

    run = sub.add_parser("run", help="the whole pipeline on a preset (today: the data stage)")
    _add_config_args(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

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
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
