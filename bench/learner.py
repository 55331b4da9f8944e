"""Learner and weight-sync benchmark, in one process (world size 1, CPU unless a GPU is present).

(a) Learner throughput: tokens/s (prompt + output tokens forwarded and back-propagated, padding not
    counted) of SFT steps and GRPO steps (inner_steps=2, KL to a reference) per ZeRO stage, and the
    time to gather the full weights (`full_state_dict`). Baseline: a plain PyTorch loop on the same
    model and batches (torch AdamW, cross-entropy on the output tokens, backward, clip, step), timed
    the same way; reported as learner SFT tokens/s / plain tokens/s per stage.
(b) Transport: the object-store transport (publish = `ray.put` of the wire format, receive = `ray.get`
    + views) against a plain in-memory copy (`torch.clone`) of the same bytes, for several sizes.
(c) Full sync into a running vLLM engine (in-process): gather + publish + receive + reload, against a
    clone of the same bytes; per model preset.

Usage: python bench/learner.py [--presets tiny,small] [--steps 5] [--sizes-mb 4,64,256] [--no-vllm]
Prints markdown tables (appended to --results PATH when given; `bench/all.py` owns bench/results.md),
then the `BENCH_SUMMARY` line of bench/all.py with the figures of the last preset (the largest by
default), the largest transport size and the last preset's vLLM sync.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from apr_ray.grpo import GRPOConfig
from apr_ray.learner.engine import Learner, LearnerConfig
from apr_ray.modeling import count_parameters, get_preset, init_model, save_pretrained
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TrainSequence
from apr_ray.weight_sync import ObjectStoreTransport, WeightReceiver

LR = 1e-4  # the learner's and the plain loop's


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} cores, {model}{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def batch(n: int, prompt: int, output: int, seed: int, vocab: int, rl: bool) -> list[TrainSequence]:
    rng = random.Random(seed)
    seqs = []
    for i in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(prompt + output)]
        seqs.append(
            TrainSequence(
                ids[:prompt],
                ids[prompt:],
                advantage=1.0 if i % 2 else -1.0,
                sampler_logprobs=[-7.0] * output if rl else None,
                tree_index=i if rl else -1,
            )
        )
    return seqs


def model_dir(preset: str, root: Path) -> tuple[Path, int]:
    tok = build_tokenizer()
    model = init_model(get_preset(preset), tok)
    total, _ = count_parameters(model)
    out = save_pretrained(model, tok, root / preset)
    return out, total


def bench_learner(
    mdir: Path, vocab: int, stages: list[int], steps: int, seqs: int, prompt: int, output: int
) -> list[dict]:
    rows = []
    for stage in stages:
        cfg = LearnerConfig(zero_stage=stage, lr=LR, micro_batch_tokens=4096, reference_model=True)
        learner = Learner(cfg, mdir)
        grpo = GRPOConfig(kl_coef=0.001, inner_steps=2)
        for kind in ("sft", "grpo"):
            rates = []
            for s in range(steps + 1):  # the first step warms up allocators and kernels
                b = batch(seqs, prompt, output, seed=s, vocab=vocab, rl=kind == "grpo")
                m = learner.sft_step(b) if kind == "sft" else learner.grpo_step(b, grpo)
                if s:
                    rates.append(m["tokens_per_s"])
            rows.append({"stage": stage, "step": kind, "tokens_per_s": statistics.median(rates)})
        t0 = time.perf_counter()
        learner.full_state_dict()
        rows[-1]["gather_s"] = rows[-2]["gather_s"] = time.perf_counter() - t0
    return rows


def bench_plain(mdir: Path, vocab: int, steps: int, seqs: int, prompt: int, output: int) -> float:
    """The learner's baseline: a plain PyTorch loop on the same model and batches as `bench_learner`'s SFT
    steps, with the learner's optimizer settings; median tokens/s of the steps after a warm-up step."""
    from transformers import AutoModelForCausalLM

    cfg = LearnerConfig()
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=cfg.betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    rates = []
    for s in range(steps + 1):
        b = batch(seqs, prompt, output, seed=s, vocab=vocab, rl=False)
        t0 = time.perf_counter()  # like Learner.sft_step: from the sequences to the optimizer step
        ids = torch.tensor([x.prompt_ids + x.output_ids for x in b])
        logits = model(input_ids=ids).logits[:, prompt - 1 : -1]  # the logits that predict the output tokens
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                 ids[:, prompt:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s:
            rates.append(ids.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def clone_time(state: dict[str, torch.Tensor]) -> float:
    return timed(lambda: {k: v.clone() for k, v in state.items()})


def bench_transport(sizes_mb: list[int]) -> list[dict]:
    transport = ObjectStoreTransport()
    rows = []
    for mb in sizes_mb:
        # like a model: a few dozen tensors of varied sizes
        numel = mb * 1024**2 // 4
        parts = [numel // 2, numel // 4, numel // 8] + [numel // 64] * 8
        state = {f"w{i}": torch.randn(n) for i, n in enumerate(parts)}
        nbytes = sum(v.numel() * 4 for v in state.values())
        handles = []
        publish = timed(lambda: handles.append(transport.publish(state, len(handles))))
        receive = timed(lambda: transport.receive(handles[-1]))
        handles.clear()
        rows.append({"bytes": nbytes, "publish_s": publish, "receive_s": receive, "clone_s": clone_time(state)})
    return rows


def bench_vllm_sync(mdir: Path) -> dict:
    """(c) for one model. Runs in its own process (see `sync_in_subprocess`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from apr_ray.rollout.vllm_ext import reload_weights

    learner = Learner(LearnerConfig(), mdir)
    llm = LLM(
        model=str(mdir),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=256 * 1024**2,
        max_model_len=512,
        worker_extension_cls="apr_ray.rollout.vllm_ext.WeightReloadExtension",
    )
    transport = ObjectStoreTransport()
    receiver = WeightReceiver(transport, lambda named, v: reload_weights(llm, named, v))
    phases: dict[str, list[float]] = {"gather_s": [], "publish_s": [], "receive_reload_s": []}
    for version in range(3):
        t0 = time.perf_counter()
        state = learner.full_state_dict()
        t1 = time.perf_counter()
        handle = transport.publish(state, version)
        t2 = time.perf_counter()
        receiver.apply(handle)
        t3 = time.perf_counter()
        phases["gather_s"].append(t1 - t0)
        phases["publish_s"].append(t2 - t1)
        phases["receive_reload_s"].append(t3 - t2)
    out = {k: min(v) for k, v in phases.items()}
    out["bytes"] = handle.num_bytes
    out["clone_s"] = clone_time(state)
    return out


def sync_in_subprocess(mdir: Path) -> dict:
    """An in-process vLLM engine tears down torch.distributed when it goes, which breaks DeepSpeed in the
    same process: each model's sync runs in a fresh interpreter."""
    res = subprocess.run(
        [sys.executable, __file__, "--sync-only", str(mdir)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("SYNC_RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"sync benchmark for {mdir} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("SYNC_RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small", help="model presets for (a) and (c)")
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seqs", type=int, default=16, help="sequences per step")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=96)
    ap.add_argument("--sizes-mb", default="4,64,256")
    ap.add_argument("--no-vllm", action="store_true", help="skip (c)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--results", type=Path, help="also append the tables to this markdown file")
    ap.add_argument("--sync-only", type=Path, help=argparse.SUPPRESS)  # internal: (c) for one model dir
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Named before DeepSpeed is first imported (transformers imports it when saving the models), as the learner
    # names it: unnamed, DeepSpeed probes for one and prints a warning on stdout, into the markdown.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=2 * 1024**3, log_to_driver=False)
    if args.sync_only:
        print("SYNC_RESULT " + json.dumps(bench_vllm_sync(args.sync_only)), flush=True)
        ray.shutdown()
        return
    lines = [
        f"\n## Learner and weight sync (bench/learner.py), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine()}; torch threads {torch.get_num_threads()}. Shared machine: orders of magnitude.",
        f"Batch: {args.seqs} sequences x ({args.prompt} prompt + {args.output} output) tokens;"
        f" median of {args.steps} steps. Plain: a PyTorch loop (torch AdamW, cross-entropy on the output"
        " tokens, clip, step) on the same model and batches.",
        "",
        "| model | params | ZeRO | step | tokens/s | full_state_dict s | SFT / plain |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    summary: dict = {}  # the last preset's figures (the largest by default), for bench/all.py
    vocab = len(build_tokenizer())
    stages = [int(s) for s in args.stages.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for preset in args.presets.split(","):
            mdir, params = model_dir(preset, Path(tmp))
            dirs[preset] = mdir
            plain = bench_plain(mdir, vocab, args.steps, args.seqs, args.prompt, args.output)
            summary = {"preset": preset, "plain_tokens_per_s": plain}
            lines.append(f"| {preset} | {params / 1e6:.1f}M | - | sft, plain PyTorch | {plain:,.0f} | | |")
            print(lines[-1], file=sys.stderr, flush=True)
            for r in bench_learner(mdir, vocab, stages, args.steps, args.seqs, args.prompt, args.output):
                versus = ""
                if r["step"] == "sft":
                    summary[f"sft_tokens_per_s_zero{r['stage']}"] = r["tokens_per_s"]
                    summary[f"sft_vs_plain_zero{r['stage']}"] = r["tokens_per_s"] / plain
                    versus = f"{r['tokens_per_s'] / plain:.2f}"
                lines.append(
                    f"| {preset} | {params / 1e6:.1f}M | {r['stage']} | {r['step']} | {r['tokens_per_s']:,.0f} |"
                    f" {r['gather_s']:.3f} | {versus} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)

        lines += [
            "",
            "Object-store transport vs an in-memory copy of the same bytes (best of 3):",
            "",
            "| MB | publish s | receive s | clone s | (publish+receive) / clone |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in bench_transport([int(s) for s in args.sizes_mb.split(",")]):
            ratio = (r["publish_s"] + r["receive_s"]) / r["clone_s"]
            lines.append(
                f"| {r['bytes'] / 2**20:.0f} | {r['publish_s']:.4f} | {r['receive_s']:.4f} | {r['clone_s']:.4f} |"
                f" {ratio:.1f} |"
            )
            summary |= {"transport_mb": r["bytes"] / 2**20, "transport_s": r["publish_s"] + r["receive_s"],
                        "clone_s": r["clone_s"], "transport_over_clone": ratio}
        print("\n".join(lines[-4:]), file=sys.stderr, flush=True)

        if not args.no_vllm:
            lines += [
                "",
                "Full sync into a running vLLM engine (in-process, fp32; best of 3):",
                "",
                "| model | MB | gather s | publish s | receive + reload s | total s | clone s | total / clone |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for preset, mdir in dirs.items():
                r = sync_in_subprocess(mdir)
                total = r["gather_s"] + r["publish_s"] + r["receive_reload_s"]
                lines.append(
                    f"| {preset} | {r['bytes'] / 2**20:.1f} | {r['gather_s']:.4f} | {r['publish_s']:.4f} |"
                    f" {r['receive_reload_s']:.4f} | {total:.4f} | {r['clone_s']:.4f} | {total / r['clone_s']:.1f} |"
                )
                summary |= {"sync_mb": r["bytes"] / 2**20, "sync_s": total, "sync_clone_s": r["clone_s"],
                            "sync_over_clone": total / r["clone_s"]}
                print(lines[-1], file=sys.stderr, flush=True)
    ray.shutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with args.results.open("a") as f:
            f.write(text)
    print("BENCH_SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
