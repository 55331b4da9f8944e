"""Critical-path bonus: where the acceleration ratio eta = 1 - tokens_critical_path / tokens_total of
solved trees lies, and how much of it the bonus `min(critical_path_coef * eta, critical_path_cap)`
(rewards.py) still tells apart (the bonus is flat above eta = cap / coef).

Trees are APR solver demonstrations (`data.solve_demo`, as the demonstration datasets are made) run
through the runtime on the replay engine: the records, tokenizer token counts (EOS included) and
critical path are those a rollout of a model writing the demonstration would give, and what the reward
reads. The runtime's limits are lifted so that every demonstration keeps its own shape. Two problem
distributions: the tiny preset's (3 numbers 1..20, targets 10..30) and the paper's (ProblemConfig
defaults). With --trees, also the trees of a file of sampled trees (a JSON list of `types.tree_to_dict`
objects, or one such object).

    .venv/bin/python bench/eta_range.py                        # ~10 s on one core
    .venv/bin/python bench/eta_range.py --trees TREES.json     # and sampled trees
    .venv/bin/python bench/eta_range.py --coef 0.5 --cap 0.2   # "at cap" for other bonus settings

Single process, no Ray, no model. Prints a markdown table, then the `BENCH_SUMMARY` line of bench/all.py
(eta's median and the share at the cap of the solved, spawning demonstrations per distribution).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.protocol import AprProtocol
from apr_ray.data import DemosConfig, solve_demo
from apr_ray.rewards import RewardConfig, acceleration_ratio, critical_path_bonus
from apr_ray.rollout.engines import ReplayEngine
from apr_ray.rollout.runtime import Runtime, RuntimeConfig, bounded_gather
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TreeRecord
from apr_ray.viz import parse_tree

DISTRIBUTIONS = {
    "tiny": ProblemConfig(num_operands=3, num_max=20, target_max=30),  # config.DataConfig's default
    "paper": ProblemConfig(),
}
PERCENTILES = (5, 25, 50, 75, 95)
# No demonstration comes near these: a tree is never cut by a limit, so eta is the demonstration's own.
UNLIMITED = RuntimeConfig(max_children=64, max_tokens=1_000_000, context_window=1_000_000,
                          max_tree_tokens=100_000_000)


def demo_trees(problems: ProblemConfig, count: int, seed: int, tokenizer, concurrency: int) -> list[TreeRecord]:
    demos_cfg = DemosConfig(seed=seed)
    demos = [solve_demo(p, demos_cfg) for p in generate_problems(problems, count, seed)]
    runtime = Runtime(ReplayEngine.from_demos(demos, tokenizer), tokenizer, AprProtocol(), UNLIMITED)
    return asyncio.run(bounded_gather(
        (runtime.run_tree(d.problem.target, d.problem.nums, problem_id=d.problem.problem_id) for d in demos),
        concurrency))


def file_trees(path: Path) -> list[TreeRecord]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = [data] if isinstance(data, dict) else data
    return [parse_tree(obj, f"{path}[{i}]") for i, obj in enumerate(items)]


def summary(trees: list[TreeRecord], cfg: RewardConfig) -> dict:
    """Percentiles of eta, share at the cap and share at eta 0, over `trees` (all solved)."""
    etas = sorted(acceleration_ratio(t) for t in trees)
    out: dict = {"n": len(etas)}
    if not etas:
        return out
    # "inclusive" interpolates between order statistics (numpy's default); it needs two points.
    cuts = statistics.quantiles(etas, n=100, method="inclusive") if len(etas) > 1 else etas * 99
    out |= {f"p{q}": cuts[q - 1] for q in PERCENTILES}
    out["at_cap"] = sum(critical_path_bonus(t, cfg) >= cfg.critical_path_cap for t in trees) / len(trees)
    out["eta_zero"] = sum(e == 0.0 for e in etas) / len(etas)
    out["bonus_p5"], out["bonus_p95"] = (min(cfg.critical_path_coef * out[k], cfg.critical_path_cap)
                                         for k in ("p5", "p95"))
    out["etas"] = etas
    return out


def rows(source: str, trees: list[TreeRecord], cfg: RewardConfig) -> list[dict]:
    solved = [t for t in trees if t.correct]
    spawning = [t for t in solved if t.metrics.num_spawns > 0]
    base = {"source": source, "trees": len(trees), "solved": len(solved)}
    return [base | {"population": "solved"} | summary(solved, cfg),
            base | {"population": "solved, spawning"} | summary(spawning, cfg)]


def table(results: list[dict], cfg: RewardConfig) -> str:
    head = ["source", "trees", "solved", "population", "n", *(f"p{q}" for q in PERCENTILES),
            f"at cap ({cfg.critical_path_cap:g})", "eta = 0", "bonus p5 -> p95"]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | ---: | --- |" + " ---: |" * (len(head) - 4)]
    for r in results:
        if r["n"] == 0:
            stats = ["-"] * (len(PERCENTILES) + 3)
        else:
            stats = [f"{r[f'p{q}']:.3f}" for q in PERCENTILES]
            stats += [f"{r['at_cap']:.0%}", f"{r['eta_zero']:.0%}", f"{r['bonus_p5']:.3f} -> {r['bonus_p95']:.3f}"]
        lines.append("| " + " | ".join([r["source"], str(r["trees"]), str(r["solved"]), r["population"],
                                        str(r["n"]), *stats]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300, help="problems per distribution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and of the demonstrations")
    parser.add_argument("--concurrency", type=int, default=64, help="trees the runtime runs at once")
    parser.add_argument("--trees", type=Path, help="also a JSON file of sampled trees (types.tree_to_dict)")
    parser.add_argument("--coef", type=float, help="critical_path_coef for 'at cap' (default: RewardConfig's)")
    parser.add_argument("--cap", type=float, help="critical_path_cap for 'at cap' (default: RewardConfig's)")
    parser.add_argument("--json", type=Path, help="also write the figures and every eta here")
    args = parser.parse_args()

    overrides = {"critical_path_coef": args.coef, "critical_path_cap": args.cap}
    cfg = RewardConfig(**{k: v for k, v in overrides.items() if v is not None})
    tokenizer = build_tokenizer()
    load_before = os.getloadavg()
    start = time.perf_counter()
    results: list[dict] = []
    figures: dict[str, float] = {}
    for name, problems in DISTRIBUTIONS.items():
        trees = demo_trees(problems, args.problems, args.seed, tokenizer, args.concurrency)
        results += rows(f"APR demos, {name}", trees, cfg)
        spawning = results[-1]
        if spawning["n"]:
            figures |= {f"{name}_eta_p50": spawning["p50"], f"{name}_at_cap": spawning["at_cap"]}
    if args.trees:
        results += rows(f"sampled, {args.trees.name}", file_trees(args.trees), cfg)
    meta = {"date": date.today().isoformat(), "cores": os.cpu_count(), "problems": args.problems,
            "seed": args.seed, "coef": cfg.critical_path_coef, "cap": cfg.critical_path_cap,
            "seconds": round(time.perf_counter() - start, 1), "load_before": [round(x, 1) for x in load_before],
            "load_after": [round(x, 1) for x in os.getloadavg()]}
    print(f"`{json.dumps(meta)}`\n")
    print(f"bonus = min({cfg.critical_path_coef:g} * eta, {cfg.critical_path_cap:g}): flat above eta = "
          + (f"{cfg.critical_path_cap / cfg.critical_path_coef:.3f}" if cfg.critical_path_coef > 0 else "0") + "\n")
    print(table(results, cfg))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    print("BENCH_SUMMARY " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
