"""The context-window curve of the solver demonstrations themselves: what a model that wrote its
demonstrations perfectly would solve under each window, APR against SoS+ on the same problems.

It bounds what a trained model can show: if the APR demonstrations need longer threads than the serial
traces, no window favours APR, however well it learned them. Each demonstration is replayed through the
runtime (`engines.ReplayEngine`) by `sweep.Sweep.context`, the same code `apr-ray eval --sweep` runs, so
the window cuts exactly as it would cut a model's threads.

    .venv/bin/python bench/demo_windows.py                                  # the tiny distribution
    .venv/bin/python bench/demo_windows.py --apr-beam 3 --apr-sub-beam 3    # smaller APR beams
    .venv/bin/python bench/demo_windows.py --operands 4                     # 4 numbers

Single process, no Ray, no model, seconds. Prints a markdown table, then the `BENCH_SUMMARY` line of
bench/all.py (the share solved per window, APR and SoS+, and their ratio).
"""

from __future__ import annotations

import argparse
import json
from datetime import date

from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.solvers import SolverConfig
from apr_ray.data import DemosConfig, solve_demo
from apr_ray.rollout.engines import ReplayEngine
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.sweep import Sweep, SweepConfig, SweptModel
from apr_ray.tokenizer import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and of the demonstrations")
    parser.add_argument("--operands", type=int, default=3)
    parser.add_argument("--num-max", type=int, default=20)
    parser.add_argument("--target-max", type=int, default=30)
    parser.add_argument("--apr-beam", type=int, default=10, help="SolverConfig.apr_max_beam")
    parser.add_argument("--apr-sub-beam", type=int, default=15, help="SolverConfig.apr_max_sub_beam")
    parser.add_argument("--windows", default="192,256,384,512,768,1024,2048,4096")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    problems = generate_problems(ProblemConfig(num_operands=args.operands, num_max=args.num_max,
                                               target_max=args.target_max), args.problems, args.seed)
    solver = SolverConfig(apr_spawn_order="generated", apr_max_beam=args.apr_beam, apr_max_sub_beam=args.apr_sub_beam)
    models = []
    for kind, label in (("apr", f"APR demos (beams {args.apr_beam}/{args.apr_sub_beam})"), ("sosp", "SoS+ demos")):
        demos = [solve_demo(p, DemosConfig(kind=kind, seed=args.seed, solver=solver)) for p in problems]
        models.append(SweptModel(label, kind, ReplayEngine.from_demos(demos, tokenizer)))
    windows = [int(w) for w in args.windows.split(",")]
    cfg = SweepConfig(problems=len(problems), windows=windows, children=[64], max_concurrent_trees=256)
    runtime = RuntimeConfig(max_children=64, max_tokens=max(windows), context_window=max(windows),
                            max_tree_tokens=100_000_000)
    sweep = Sweep(cfg, problems, tokenizer, runtime, progress=lambda _: None)
    rows = [r for m in models for r in sweep.context(m)]
    print(f"## Solver demonstrations under a context window (bench/demo_windows.py), {date.today()}\n")
    print(f"{len(problems)} problems: {args.operands} numbers in 1..{args.num_max}, targets up to {args.target_max}; "
          f"seed {args.seed}. Share solved when every thread is cut at the window.\n")
    print("| demonstrations | " + " | ".join(str(w) for w in windows) + " |")
    print("| --- |" + " ---: |" * len(windows))
    figures: dict[str, float] = {"problems": len(problems)}
    for model in models:
        line = [r for r in rows if r["model"] == model.label]
        print(f"| {model.label} | " + " | ".join(f"{r['solved']:.3f}" for r in line) + " |")
        figures |= {f"{model.protocol}_solved_w{r['window']}": r["solved"] for r in line}
    for w in windows:
        apr, sosp = figures[f"apr_solved_w{w}"], figures[f"sosp_solved_w{w}"]
        figures[f"apr_over_sosp_w{w}"] = apr / sosp if sosp else float("inf") if apr else float("nan")
    print("BENCH_SUMMARY " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
