"""A whole GRPO step against TRL's `GRPOTrainer`, and tree GRPO against serial GRPO, in one run.

(a) Serial GRPO, like for like: the same untrained `tiny` Llama and tokenizer, the same 8 Countdown
    problems per step x 4 samples, completions of at most --completion tokens at T = 1, no KL, Dr. GRPO
    normalisation (`loss_type="dr_grpo"` in TRL, `loss_norm=constant` here), lr 1e-4, one optimizer step
    per batch, every sample trained (apr-ray's `drop_zero_adv_groups` off: an untrained model solves
    nothing, and TRL back-propagates zero advantages too).
    - TRL `GRPOTrainer` (HF generate, in a child process of its own, torch's threads);
    - `apr-ray grpo` (Ray, one generator actor, a DeepSpeed learner actor, the weight sync every step),
      the root thread only (`rollout.runtime.max_depth=0`), with each rollout backend at its best thread count
      (vLLM 2, transformers 1, the default), and the transformers generator again at 2 threads.
(b) Tree GRPO against serial GRPO for the same generated tokens: a model SFT-trained on the APR
    demonstrations (--tree-model, or trained here for --sft-steps with the plain script) writes spawn/join
    trees; the untrained model writes serial samples as long as those trees' mean size. Reported: seconds
    per 1,000 generated tokens, tree / serial.

Each figure is the median of the steps after the first (the first one compiles and warms up).

    .venv/bin/pip install -e '.[bench]'    # TRL, never a runtime dependency
    .venv/bin/python bench/grpo_step.py    # ~8 min on 2 cores; prints markdown tables
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRPO_SETTINGS = [
    "data.train_problems=200", "data.val_problems=8", "data.test_problems=4",
    "grpo.problems_per_step=8", "grpo.algorithm.group_size=4", "grpo.eval_every=0", "grpo.checkpoint_every=0",
    "grpo.algorithm.drop_zero_adv_groups=false", "grpo.learner.lr=1e-4",
    "eval.problems=4", "eval.sampled_problems=0", "eval.sample_trees=0", "tracking.enabled=false",
]


def _median_steps(metrics: Path, trees: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"grpo/step_s"' in line]
    if len(rows) < 2:
        raise RuntimeError(f"{metrics}: {len(rows)} GRPO steps logged, need at least 2 (the first is warm-up)")
    timed = rows[1:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    return {"step_s": med("grpo/step_s"), "rollout_s": med("grpo/time_rollout_s"),
            "train_s": med("grpo/time_train_s"), "sync_s": med("grpo/time_sync_s"),
            "tokens": med("grpo/tokens_total_mean") * trees, "steps": len(timed)}


def apr_ray_grpo(model_dir: Path | None, settings: list[str], steps: int) -> dict[str, float]:
    """`apr-ray grpo` in a child process (a fresh Ray per run), timed from its metrics.jsonl."""
    out = Path(tempfile.mkdtemp(prefix="bench-grpo-")) / "run"
    cmd = [sys.executable, "-m", "apr_ray.cli", "grpo", "--set", f"output_dir={out}", "--set", f"grpo.steps={steps}"]
    for s in GRPO_SETTINGS + settings:
        cmd += ["--set", s]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return _median_steps(out / "metrics.jsonl", trees=8 * 4)


def trl_grpo(model_dir: Path, completion: int, steps: int) -> dict[str, float]:
    """TRL's GRPOTrainer on the same model, problems, group, completion length and optimizer settings."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from apr_ray.config import load_config
    from apr_ray.countdown.checker import check_trace
    from apr_ray.countdown.problems import generate_problems
    from apr_ray.countdown.protocol import get_protocol
    from apr_ray.tokenizer import load_tokenizer

    cfg = load_config(None, [])
    protocol = get_protocol("sosp")
    problems = generate_problems(cfg.data.problems, 8 * steps, seed=1)
    rows = [{"prompt": protocol.root_prompt(p.target, p.nums), "target": p.target, "nums": list(p.nums)}
            for p in problems]

    def correct(prompts, completions, target, nums, **_):
        return [float(check_trace(t, n, p + c).ok) for p, c, t, n in zip(prompts, completions, target, nums)]

    times: list[float] = []
    tokens: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * 32)

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=32, num_generations=4, max_completion_length=completion, max_steps=steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, loss_type="dr_grpo",
        temperature=1.0, top_p=1.0, num_iterations=1, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, max_grad_norm=1.0, adam_beta2=0.95,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=correct, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[StepClock()])
    trainer.train()
    del trainer
    timed = times[1:]
    return {"step_s": statistics.median(timed), "tokens": statistics.median(tokens[1:]) if len(tokens) > 1 else 0.0,
            "steps": len(timed), "rollout_s": float("nan"), "train_s": float("nan"), "sync_s": float("nan")}


def trl_in_subprocess(model_dir: Path, completion: int, steps: int) -> dict[str, float]:
    """TRL in a fresh interpreter: its Trainer sets process-wide state (accelerate's environment, torch
    threads) that a Ray job started afterwards from the same process would inherit."""
    cmd = [sys.executable, __file__, "--trl-only", str(model_dir), "--completion", str(completion),
           "--steps", str(steps)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("TRL_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"TRL run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("TRL_RESULT "))


def sft_model(steps: int) -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-sft-")) / "run"
    cmd = [sys.executable, "-m", "apr_ray.plain", "--set", f"output_dir={out}", "--set", f"sft.steps={steps}",
           "--set", "eval.problems=4", "--set", "eval.sampled_problems=0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out / "sft" / "model"


def init_model_dir() -> Path:
    from apr_ray.config import load_config
    from apr_ray.workspace import Workspace, ensure_init_model

    cfg = load_config(None, [f"output_dir={tempfile.mkdtemp(prefix='bench-init-')}"])
    return ensure_init_model(cfg, Workspace(Path(cfg.output_dir)))


def _row(name: str, r: dict[str, float], base: float) -> str:
    def f(x: float) -> str:
        return "-" if x != x else f"{x:.2f}"

    return (f"| {name} | {r['steps']} | {r['tokens']:,.0f} | {f(r['rollout_s'])} | {f(r['train_s'])} | "
            f"{f(r['sync_s'])} | {r['step_s']:.2f} | {base / r['step_s']:.2f} |")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is not timed)")
    parser.add_argument("--completion", type=int, default=128, help="completion tokens per sample (serial)")
    parser.add_argument("--tree-model", type=Path, help="an APR-trained model directory (default: train one)")
    parser.add_argument("--sft-steps", type=int, default=400, help="SFT steps of the tree model trained here")
    parser.add_argument("--skip-trl", action="store_true", help="leave TRL out (not installed)")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"),
                        help="generator of the tree-vs-serial runs (the tiny preset's: transformers)")
    parser.add_argument("--trl-only", type=Path, help=argparse.SUPPRESS)  # internal: TRL's run on this model
    args = parser.parse_args(argv)
    if args.trl_only:
        print("TRL_RESULT " + json.dumps(trl_grpo(args.trl_only, args.completion, args.steps)), flush=True)
        return {}

    init_dir = init_model_dir()
    serial = ["rollout.runtime.max_depth=0", f"rollout.runtime.max_tokens={args.completion}",
              "rollout.runtime.context_window=512"]
    runs: dict[str, dict[str, float]] = {}
    if not args.skip_trl:
        runs["TRL GRPOTrainer (HF generate)"] = trl_in_subprocess(init_dir, args.completion, args.steps)
    # Threads per generator: vLLM's CPU backend is fastest with both cores; the transformers engine with one
    # (the default; OpenMP's per-op cost dominates this 1M-parameter model), and with two as the former default.
    for name, backend, threads in (("vllm generator", "vllm", 2), ("transformers generator", "transformers", 1),
                                   ("transformers generator, 2 threads", "transformers", 2)):
        runs[f"apr-ray grpo, {name}"] = apr_ray_grpo(
            init_dir, serial + [f"rollout.backend={backend}", f"rollout.pool.threads_per_worker={threads}"], args.steps)
    base = runs.get("TRL GRPOTrainer (HF generate)", runs["apr-ray grpo, vllm generator"])["step_s"]
    print(f"### A serial GRPO step: 8 problems x 4 samples x <= {args.completion} tokens, untrained tiny model\n")
    print("| run | steps timed | generated tokens / step | rollout s | train s | sync s | step s | speed vs "
          f"{'TRL' if not args.skip_trl else 'vLLM'} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        print(_row(name, r, base))

    tree_dir = args.tree_model or sft_model(args.sft_steps)
    backend = f"rollout.backend={args.backend}"
    tree = apr_ray_grpo(tree_dir, [backend, "rollout.runtime.max_tokens=256", "rollout.runtime.context_window=1024"],
                        args.steps)
    length = max(16, round(tree["tokens"] / 32))
    same_tokens = apr_ray_grpo(init_dir, [backend, "rollout.runtime.max_depth=0", f"rollout.runtime.max_tokens={length}",
                                          f"rollout.runtime.context_window={length + 128}"], args.steps)
    per_k = {k: r["step_s"] / r["tokens"] * 1000 for k, r in (("tree", tree), ("serial", same_tokens))}
    print(f"\n### Tree GRPO vs serial GRPO at the same generated tokens ({args.backend} generator; tree model: "
          f"{'given' if args.tree_model else f'{args.sft_steps} SFT steps'})\n")
    print("| run | steps timed | generated tokens / step | rollout s | train s | sync s | step s | s per 1k tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("tree GRPO (spawn/join)", tree), (f"serial GRPO ({length} tokens a sample)", same_tokens)):
        row = _row(name, r, 1.0).rsplit("|", 2)[0]
        print(f"{row}| {r['step_s'] / r['tokens'] * 1000:.3f} |")
    ratio = per_k["tree"] / per_k["serial"]
    print(f"\ntree / serial seconds per 1k generated tokens: **{ratio:.2f}** (target <= 1.2)")
    summary = {"tree_over_serial": ratio}
    if not args.skip_trl:
        for b in ("transformers", "vllm"):
            summary[f"serial_speed_vs_trl_{b}"] = base / runs[f"apr-ray grpo, {b} generator"]["step_s"]
        summary["serial_speed_vs_trl_transformers_2threads"] = (
            base / runs["apr-ray grpo, transformers generator, 2 threads"]["step_s"])
    return summary


if __name__ == "__main__":
    main()
