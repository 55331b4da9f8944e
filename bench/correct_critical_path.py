"""The critical path of the trees a model solves: what a critical-path reward should shorten.

The validation ladder averages the critical path over every tree, wrong ones included, so a reward that
changes the solve rate changes that mean for two reasons at once. This script evaluates each model greedily
on the same validation problems (the transformers engine, in this process) and reports, over the trees it
solves, the mean critical path and the mean tree size.

    python bench/correct_critical_path.py --problems runs/exp/tl-sft/data/problems MODEL_DIR [MODEL_DIR ...]
        [--config tiny-long] [--count 200] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="Hugging Face model directories")
    parser.add_argument("--problems", type=Path, required=True, help="a problems dataset (its val split is used)")
    parser.add_argument("--config", default="tiny-long", help="preset whose runtime limits and protocol apply")
    parser.add_argument("--count", type=int, default=200, help="the first this many validation problems")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from apr_ray.config import load_config
    from apr_ray.data import read_problems
    from apr_ray.evaluation import Evaluator, evaluate_model
    from apr_ray.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    problems = read_problems(args.problems, "val")[: args.count]
    evaluator = Evaluator(problems, build_tokenizer(), cfg.protocol, cfg.rollout.runtime, cfg.eval.sampling,
                          max_concurrent_trees=cfg.rollout.pool.max_concurrent_trees)
    print("| model | solved | correct trees: critical path | correct trees: tokens | all trees: critical path |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for model_dir in args.models:
        trees = evaluate_model(evaluator, AutoModelForCausalLM.from_pretrained(model_dir)).trees
        solved = [t for t in trees if t.correct]

        def mean(values: list[int]) -> float:
            return sum(values) / len(values) if values else float("nan")

        print(f"| {model_dir} | {len(solved) / len(trees):.3f} "
              f"| {mean([t.metrics.tokens_critical_path for t in solved]):.1f} "
              f"| {mean([t.metrics.tokens_total for t in solved]):.1f} "
              f"| {mean([t.metrics.tokens_critical_path for t in trees]):.1f} |", flush=True)


if __name__ == "__main__":
    main()
