"""Data-generation benchmark: problems, solver demonstrations per second per core, the full row path,
Ray Data scaling over workers, and (optionally) the APR reference generator timed in the same run.

    .venv/bin/python bench/datagen.py                       # ~5 min on 2 cores
    .venv/bin/python bench/datagen.py --reference-dir DIR   # DIR holds the reference's src/data/search.py
                                                            # and src/countdown_utils.py (never vendored here)

Each figure is the best of `--repeat` runs (other work on a shared machine only ever slows a run
down); the load averages printed with them say how busy the machine was. Without --reference-dir the
ours / reference ratios use the reference's rates recorded on this machine class (RECORDED_REFERENCE),
and say so. Prints a markdown table, then the `BENCH_SUMMARY` line of bench/all.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from apr_ray.countdown.demos import flatten_apr, flatten_sosp
from apr_ray.countdown.problems import ProblemConfig, generate_problems, is_solvable
from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp
from apr_ray.apr_import import import_apr
from apr_ray.data import DemosConfig, DemoWorker, TextEncoder, problems_table
from apr_ray.tokenizer import build_tokenizer


# The reference generator's search rates, single process, 300 problems, on the 2-core AMD EPYC of
# bench/results.md (2026-11-23, `--reference-dir` with the reference rebuilt outside the repository):
# the baseline when its source is not at hand.
RECORDED_REFERENCE = {"ref_apr_solve_per_s": 442.0, "ref_sosp_solve_per_s": 1312.0}
RECORDED_REFERENCE_NOTE = "APR reference, recorded 2026-11-23 on a 2-core AMD EPYC (not this run)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_problems(n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    draws = [(tuple(rng.randint(1, 99) for _ in range(4)), rng.randint(10, 100)) for _ in range(20 * n)]
    start = time.perf_counter()
    solvable = sum(is_solvable(nums, target) for nums, target in draws)
    checks_s = rate(len(draws), time.perf_counter() - start)
    start = time.perf_counter()
    generate_problems(ProblemConfig(), n, seed)
    return {"is_solvable_checks_per_s": checks_s, "solvable_share": solvable / len(draws),
            "problems_per_s": rate(n, time.perf_counter() - start)}


def bench_solvers(problems, seed: int) -> dict[str, float]:
    cfg = SolverConfig()
    out: dict[str, float] = {}
    start = time.perf_counter()
    trees = [solve_apr(p, cfg, random.Random(f"{seed}/{i}")) for i, p in enumerate(problems)]
    out["apr_solve_per_s"] = rate(len(problems), time.perf_counter() - start)
    start = time.perf_counter()
    for p, tree in zip(problems, trees):
        flatten_apr(p, tree)
    out["apr_flatten_check_per_s"] = rate(len(problems), time.perf_counter() - start)
    start = time.perf_counter()
    traces = [solve_sosp(p, cfg, random.Random(f"{seed}/{i}"))[0] for i, p in enumerate(problems)]
    out["sosp_solve_per_s"] = rate(len(problems), time.perf_counter() - start)
    start = time.perf_counter()
    for p, trace in zip(problems, traces):
        flatten_sosp(p, trace)
    out["sosp_flatten_check_per_s"] = rate(len(problems), time.perf_counter() - start)
    return out


def bench_rows(problems, encoder: TextEncoder, tokenizer) -> dict[str, float]:
    """The whole per-problem path of a Ray Data task (solve, flatten, check, tokenize, Arrow table),
    and the tokenizer alone (ours vs the Rust pipeline) on the same texts."""
    batch = problems_table([("train", i, p) for i, p in enumerate(problems)])
    out: dict[str, float] = {}
    for kind in ("apr", "sosp"):
        worker = DemoWorker(DemosConfig(kind=kind), encoder)
        start = time.perf_counter()
        table = worker(batch)
        seconds = time.perf_counter() - start
        out[f"{kind}_rows_per_s"] = rate(len(problems), seconds)
        tokens = sum(len(x) for x in table["completion_ids"].to_pylist()) + sum(
            len(x) for x in table["prompt_ids"].to_pylist())
        out[f"{kind}_tokens_per_demo"] = tokens / len(problems)
    texts = [s.completion for p in problems[:100]
             for s in flatten_apr(p, solve_apr(p, SolverConfig(), random.Random(0))).sequences]
    chars = sum(map(len, texts))
    start = time.perf_counter()
    ours = encoder(texts)
    out["encoder_tokens_per_s"] = rate(sum(map(len, ours)), time.perf_counter() - start)
    start = time.perf_counter()
    theirs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out["hf_tokenizer_tokens_per_s"] = rate(sum(map(len, theirs)), time.perf_counter() - start)
    out["encoder_matches_tokenizer"] = float(ours == theirs)
    out["chars_per_token"] = chars / max(1, sum(map(len, ours)))
    return out


def bench_reference(reference_dir: Path, problems, seed: int, tokenizer) -> dict[str, float]:
    """The reference generator on the same problems, beams drawn as its generate_apr.py /
    generate_sosp.py draw them (APR: beam U{1..10}, sub-call beam U{beam..15}, threshold 0.9; SoS+:
    beam U{1..5}, threshold 0.5; both mult_heuristic). Its Llama token counting is left out."""
    sys.path.insert(0, str(reference_dir))
    from src.countdown_utils import mult_heuristic  # type: ignore[import-not-found]
    from src.data.search import apr, sosp  # type: ignore[import-not-found]

    random.seed(seed)
    records = []
    start = time.perf_counter()
    for p in problems:
        beam = random.randint(1, 10)
        sub_beam = random.randint(beam, 15) if 15 > beam else 15
        trace = apr(p.target, list(p.nums), beam, sub_call_beam_size=sub_beam, promising_threshold=0.9,
                    heuristic=mult_heuristic)
        records.append({"target": p.target, "nums": list(p.nums), "trace_dict": trace,
                        "search_path": trace["main_calls"][-1]})
    out = {"ref_apr_solve_per_s": rate(len(problems), time.perf_counter() - start)}
    start = time.perf_counter()
    sosp_records = []
    for p in problems:
        beam = random.choice(range(1, 6))
        sosp_records.append({"target": p.target, "nums": list(p.nums),
                             "search_path": sosp(p.target, list(p.nums), beam, heuristic=mult_heuristic)})
    out["ref_sosp_solve_per_s"] = rate(len(problems), time.perf_counter() - start)
    # the reference's own output through our import: every record must pass the protocol and checker
    with tempfile.TemporaryDirectory() as tmp:
        for kind, recs in (("apr", records), ("sosp", sosp_records)):
            path = Path(tmp) / f"ref_{kind}.json"
            path.write_text(json.dumps(recs, indent=2))
            summary = import_apr(path, Path(tmp) / f"out_{kind}", tokenizer, kind=kind, progress=False)
            out[f"ref_{kind}_import_per_s"] = summary.per_second
            out[f"ref_{kind}_import_rejected"] = float(summary.rejected)
            out[f"ref_{kind}_solved_share"] = summary.solved_share
    return out


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: max(run[key] for run in runs) for key in runs[0]}


def bench_ray(n: int, workers_list: list[int], seed: int, tokenizer, repeat: int) -> dict[str, float]:
    import ray

    from apr_ray.data import generate_demos, generate_problem_data

    # Two logical CPUs beyond the map tasks: the Parquet write tasks need one each, and with exactly
    # `workers` CPUs they queue behind the solver tasks (measured: no speed-up from 1 to 2 workers).
    ray.init(num_cpus=max(workers_list) + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for _ in range(repeat):
            for workers in workers_list:  # 5x the demo problems: problem generation is ~5x faster per problem
                summary = generate_problem_data(root / f"problems{workers}", {"train": 5 * n}, seed=seed,
                                                workers=workers, overwrite=True, progress=False)
                key = f"ray_problems_per_s_w{workers}"
                out[key] = max(out.get(key, 0.0), rate(5 * n, summary.seconds))
        problems = root / f"problems{workers_list[0]}"
        # warm-up: start the worker processes and their imports once, outside the timings
        generate_demos(problems, root / "warm", config=DemosConfig(batch_problems=2), tokenizer=tokenizer,
                       limit=4 * max(workers_list), workers=max(workers_list), progress=False)
        for _ in range(repeat):  # worker counts alternate, so a busy spell does not favour one of them
            for kind in ("apr", "sosp"):
                for workers in workers_list:
                    summary = generate_demos(problems, root / f"{kind}{workers}", overwrite=True, tokenizer=tokenizer,
                                             config=DemosConfig(kind=kind), workers=workers,
                                             limit=n, progress=False)
                    key = f"ray_{kind}_demos_per_s_w{workers}"
                    out[key] = max(out.get(key, 0.0), summary.per_second)
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300, help="problems for the single-process figures")
    parser.add_argument("--ray-problems", type=int, default=2000,
                        help="problems for the Ray Data scaling runs (each pipeline has ~3 s of fixed cost)")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray Data worker counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is reported")
    parser.add_argument("--reference-dir", type=Path, help="a checkout holding the reference's src/ (timed alongside)")
    parser.add_argument("--sections", default="problems,solvers,rows,reference,ray",
                        help="which figures to take (reference also needs --reference-dir)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    encoder = TextEncoder.from_tokenizer(tokenizer)
    load_before = os.getloadavg()
    figures: dict[str, float] = {}
    sections = set(args.sections.split(","))
    unknown = sections - {"problems", "solvers", "rows", "reference", "ray"}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}")
    problems = generate_problems(ProblemConfig(), args.problems, args.seed + 1)
    if "problems" in sections:
        figures |= best([bench_problems(args.problems, args.seed) for _ in range(args.repeat)])
    if "solvers" in sections:
        figures |= best([bench_solvers(problems, args.seed) for _ in range(args.repeat)])
    if "rows" in sections:
        figures |= best([bench_rows(problems, encoder, tokenizer) for _ in range(args.repeat)])
    reference = None
    if "reference" in sections and args.reference_dir:
        runs = [bench_reference(args.reference_dir, problems, args.seed, tokenizer) for _ in range(args.repeat)]
        figures |= best(runs)
        reference = "APR reference, same run"
    elif "reference" in sections:
        figures |= RECORDED_REFERENCE
        reference = RECORDED_REFERENCE_NOTE
    if reference and "solvers" in sections:
        figures["apr_solve_vs_ref"] = figures["apr_solve_per_s"] / figures["ref_apr_solve_per_s"]
        figures["sosp_solve_vs_ref"] = figures["sosp_solve_per_s"] / figures["ref_sosp_solve_per_s"]
    if "ray" in sections:
        workers = [int(w) for w in args.workers.split(",")]
        figures |= bench_ray(args.ray_problems, workers, args.seed, tokenizer, args.repeat)
        for what in ("problems", "apr_demos", "sosp_demos"):
            base = figures[f"ray_{what}_per_s_w{workers[0]}"]
            for w in workers[1:]:
                figures[f"ray_{what}_speedup_w{w}"] = figures[f"ray_{what}_per_s_w{w}"] / base
    meta = {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "load_before": [round(x, 1) for x in load_before],
            "load_after": [round(x, 1) for x in os.getloadavg()], "problems": args.problems,
            "ray_problems": args.ray_problems, "repeat": args.repeat, "reference": reference}
    print(f"`{json.dumps(meta)}`\n")
    print("| figure | value |\n| --- | ---: |")
    for key, value in figures.items():
        print(f"| {key} | {value:,.3f} |" if value < 10 else f"| {key} | {value:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "figures": figures}, indent=2) + "\n")
    print("BENCH_SUMMARY " + json.dumps(figures | {"reference": reference}), flush=True)


if __name__ == "__main__":
    main()
