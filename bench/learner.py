"""Learner and weight-sync benchmark, in one process (world size 1, CPU unless a GPU is present).

(a) Learner throughput: tokens/s (prompt + output tokens forwarded and back-propagated, padding not
    counted) of SFT steps and GRPO steps (inner_steps=2, KL to a reference) per ZeRO stage, and the
    time to gather the full weights (`full_state_dict`).
(b) Transport: the object-store transport (publish = `ray.put` of the wire format, receive = `ray.get`
    + views) against a plain in-memory copy (`torch.clone`) of the same bytes, for several sizes.
(c) Full sync into a running vLLM engine (in-process): gather + publish + receive + reload, against a
    clone of the same bytes; per model preset.

Usage: python bench/learner.py [--presets tiny,small] [--steps 5] [--sizes-mb 4,64,256] [--no-vllm]
Prints markdown tables and appends them to bench/results.md (or --results) with the machine and the date.
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

RESULTS = Path(__file__).with_name("results.md")


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
        cfg = LearnerConfig(zero_stage=stage, lr=1e-4, micro_batch_tokens=4096, reference_model=True)
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
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file the tables are appended to")
    ap.add_argument("--sync-only", type=Path, help=argparse.SUPPRESS)  # internal: (c) for one model dir
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
        f" median of {args.steps} steps.",
        "",
        "| model | params | ZeRO | step | tokens/s | full_state_dict s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for preset in args.presets.split(","):
            mdir, params = model_dir(preset, Path(tmp))
            dirs[preset] = (mdir, params)
            vocab = len(build_tokenizer())
            stages = [int(s) for s in args.stages.split(",")]
            for r in bench_learner(mdir, vocab, stages, args.steps, args.seqs, args.prompt, args.output):
                lines.append(
                    f"| {preset} | {params / 1e6:.1f}M | {r['stage']} | {r['step']} | {r['tokens_per_s']:,.0f} |"
                    f" {r['gather_s']:.3f} |"
                )
                print(lines[-1], flush=True)

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
        print("\n".join(lines[-4:]), flush=True)

        if not args.no_vllm:
            lines += [
                "",
                "Full sync into a running vLLM engine (in-process, fp32; best of 3):",
                "",
                "| model | MB | gather s | publish s | receive + reload s | total s | clone s | total / clone |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for preset, (mdir, _) in dirs.items():
                r = sync_in_subprocess(mdir)
                total = r["gather_s"] + r["publish_s"] + r["receive_reload_s"]
                lines.append(
                    f"| {preset} | {r['bytes'] / 2**20:.1f} | {r['gather_s']:.4f} | {r['publish_s']:.4f} |"
                    f" {r['receive_reload_s']:.4f} | {total:.4f} | {r['clone_s']:.4f} | {total / r['clone_s']:.1f} |"
                )
                print(lines[-1], flush=True)
    ray.shutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    with args.results.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
