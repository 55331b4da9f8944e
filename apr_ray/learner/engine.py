"""The learner: a DeepSpeed engine around a Hugging Face causal LM, with SFT and GRPO steps.

Owns the process-group set-up, the DeepSpeed config (ZeRO stage 0-3, AdamW, clipping, precision),
micro-batching with gradient accumulation (one optimizer step per call), the frozen reference model
for the KL term, checkpoints (DeepSpeed's, optimizer included) and full-weight export (safetensors for
transformers / vLLM, or an in-memory state dict for a weight sync). The losses come from
`apr_ray.grpo`. Must not import Ray or vLLM: `apr_ray.learner.actor` puts it in Ray actors.

Data parallelism: every rank calls the same method with its own share of the batch. The loss
denominators (trees for GRPO, token weight for SFT) are summed over ranks first, and each rank's loss
is multiplied by the world size because DeepSpeed averages gradients over ranks: the gradient is then
that of the whole batch, whatever the split. Ranks agree on the number of micro-batches (a rank with
fewer runs zero-loss dummies) because ZeRO-2/3 communicate inside every forward / backward.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apr_ray.learner.config import LearnerConfig
from apr_ray.grpo import GRPOConfig, MicroBatch, make_micro_batches, policy_loss, sft_loss, token_logprobs
from apr_ray.types import TrainSequence

# Files of a model directory that are weights (never copied on export: the export writes its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
# Key of our own entries in DeepSpeed's client_state, kept apart from the caller's.
_CLIENT_KEY = "apr_ray"
# Gather at most this many bytes of ZeRO-3 partitions at once when building a full state dict.
_GATHER_BUCKET_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the learner process group."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port (world size 1 only)
    local_rank: int = 0  # device index on this node (0 under Ray, which shows each actor its own GPU)


def free_port() -> int:
    """A TCP port free on this host at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _use_cuda() -> bool:
    return torch.cuda.is_available()


def _name_accelerator() -> None:
    """Named, DeepSpeed does not probe for an accelerator and warn that it fell back to the CPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _use_cuda() else "cpu")


def _forget_stale_deepspeed_groups() -> None:
    """DeepSpeed caches a clone of the world group in a module global. When the process group it came
    from is gone (an in-process vLLM engine shut its group down, a previous learner's group was
    destroyed), the clone is no longer registered and every DeepSpeed engine fails at its first
    broadcast ("Group ... is not registered"). Drop the clone so DeepSpeed makes a new one."""
    import torch.distributed as td
    from deepspeed.utils import groups

    clone = groups._WORLD_GROUP
    if clone is not None and (not td.is_initialized() or clone not in td.distributed_c10d._world.pg_group_ranks):
        groups._WORLD_GROUP = None


def init_process_group(dist: DistInfo, timeout_s: int = 1800) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU); a no-op when it is up.

    The env vars are set here because DeepSpeed otherwise tries MPI discovery (mpi4py).
    """
    _name_accelerator()
    import deepspeed
    import torch.distributed as td

    os.environ.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank))
    if not _use_cuda():
        # On CPU DeepSpeed JIT-compiles a shared-memory allreduce (C++) the first time a machine starts a
        # process group: needs g++, took ~1.5 CPU-minutes (5 wall-minutes) here. gloo alone serves CPU runs.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _forget_stale_deepspeed_groups()
    if td.is_initialized():  # e.g. an in-process vLLM engine started it (world size 1)
        if (td.get_rank(), td.get_world_size()) != (dist.rank, dist.world_size):
            raise RuntimeError(
                f"this process already belongs to a process group as rank {td.get_rank()} of"
                f" {td.get_world_size()}; cannot join as rank {dist.rank} of {dist.world_size}"
            )
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)  # wraps the existing group
        return
    if dist.master_port == 0 and dist.world_size > 1:
        raise ValueError(f"master_port=0 (pick any) only works for world_size 1, got {dist.world_size}")
    port = dist.master_port or free_port()
    os.environ.update(MASTER_ADDR=dist.master_addr, MASTER_PORT=str(port))
    if _use_cuda():
        torch.cuda.set_device(dist.local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if _use_cuda() else "gloo",
        auto_mpi_discovery=False,
        distributed_port=port,
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=timedelta(seconds=timeout_s),
        verbose=False,
    )


def deepspeed_config(cfg: LearnerConfig, bf16: bool, clip_in_deepspeed: bool) -> dict[str, Any]:
    """The DeepSpeed config of the trained model.

    Batch sizes are notional: micro-batches are formed here by token budget and the caller owns the
    accumulation boundary (`managed_gradient_accumulation: false`: every `engine.step()` is one).
    `torch_adam` keeps DeepSpeed from JIT-compiling its fused Adam.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip if clip_in_deepspeed else 0.0,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
    }
    return ds


def _reference_config(cfg: LearnerConfig, bf16: bool) -> dict[str, Any]:
    """Inference-only engine: sharded like the policy under ZeRO-3, replicated otherwise."""
    zero: dict[str, Any] = {"stage": 3 if cfg.zero_stage == 3 else 0}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
    }


class Learner:
    """One data-parallel rank of the trained model.

    Built from a Hugging Face model directory (config + weights, tokenizer files optional): every
    rank loads the same weights, and the reference model (if any) is that initial model.
    """

    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, dist: DistInfo | None = None) -> None:
        _name_accelerator()
        import deepspeed
        from transformers import AutoConfig

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model_dir {self.model_dir}: no config.json (not a Hugging Face model dir)")
        self.dist = dist or DistInfo()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_process_group(self.dist, cfg.dist_timeout_s)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and _use_cuda())
        self.device = torch.device("cuda", torch.cuda.current_device()) if _use_cuda() else torch.device("cpu")
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        pad = self.hf_config.pad_token_id
        if pad is None:
            raise ValueError(f"{self.model_dir / 'config.json'}: no pad_token_id (the learner pads with it)")
        self.pad_id = int(pad)

        # Stage 0 in fp32 is the one set-up where DeepSpeed clips through its own helper and reports no
        # gradient norm: there the optimizer pre-step hook below clips and records the norm instead.
        self._clip_in_hook = cfg.zero_stage == 0 and not self.bf16
        self._hook_grad_norm: float | None = None
        self._step_lr = cfg.lr
        ds_cfg = deepspeed_config(cfg, self.bf16, clip_in_deepspeed=not self._clip_in_hook)
        model = self._load_model()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        scheduler = None
        if cfg.warmup_steps > 0 or cfg.lr_schedule != "constant":
            cfg.lr_multiplier(cfg.decay_steps)  # a schedule without a length fails here, not mid-run
            scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_multiplier)  # noqa: E731
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                               lr_scheduler=scheduler)
        if self._clip_in_hook:
            self.engine.optimizer.register_step_pre_hook(self._clip_and_record_norm)

        self.reference = None
        if cfg.reference_model:
            ref = self._load_model()
            ref.requires_grad_(False)
            self.reference, *_ = deepspeed.initialize(model=ref, config=_reference_config(cfg, self.bf16))
            self.reference.eval()

    # ------------------------------------------------------------------ set-up helpers

    def _load_model(self) -> torch.nn.Module:
        """The full model in fp32 on this rank's CPU; `deepspeed.initialize` casts it (bf16 with fp32
        masters) and, under ZeRO-3, partitions it.

        Loading pre-partitioned (transformers' HfDeepSpeedConfig) would need the `accelerate` package; a
        full CPU copy per rank costs 4 bytes per parameter of host memory, briefly.
        """
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        model.config.use_cache = False  # training forwards never need a KV cache
        return model

    def _clip_and_record_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        self._hook_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------ properties

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (its parameters are partitions under ZeRO-3)."""
        return self.engine.module

    @property
    def step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return int(self.engine.global_steps)

    # ------------------------------------------------------------------ collectives

    def _all_sum(self, values: Sequence[float]) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as td

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t.tolist()

    def _all_max(self, value: int) -> int:
        if self.world_size == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ batches

    def _micro_batches(self, seqs: Sequence[TrainSequence], rl: bool) -> tuple[list[MicroBatch], int]:
        """Micro-batches with batch-global denominators, and how many every rank will run.

        A rank that rejects its share tells the others before raising, so that none waits in a collective.
        """
        error: ValueError | None = None
        try:
            if seqs and (seqs[0].sampler_logprobs is not None) != rl:  # make_micro_batches refuses mixtures
                if rl:
                    raise ValueError("grpo_step needs sampler_logprobs on every sequence")
                raise ValueError("sft_step needs sequences without sampler_logprobs (demonstrations)")
            local = make_micro_batches(seqs, self.cfg.micro_batch_tokens, self.pad_id)
        except ValueError as e:
            error, local = e, []
        num_trees = len({s.tree_index for s in seqs if s.tree_index >= 0})
        num_trees += sum(1 for s in seqs if s.tree_index < 0)  # a demonstration counts as a tree
        token_weight = sum(s.weight * len(s.output_ids) for s in seqs)
        # Sequences of one tree must sit on one rank for this sum to count each tree once
        # (actor.split_by_tree guarantees it).
        g_trees, g_weight, g_errors = self._all_sum([num_trees, token_weight, error is not None])
        if error is not None:
            raise error
        if g_errors:
            raise ValueError(f"{int(g_errors)} other learner rank(s) rejected their share of the batch")
        if g_trees == 0:
            raise ValueError("empty batch: no rank was given any sequence")
        local = [replace(mb, num_trees=int(round(g_trees)), total_token_weight=g_weight) for mb in local]
        count = self._all_max(len(local))
        dummy = self._dummy_micro_batch(rl, int(round(g_trees)), g_weight)
        return local + [dummy] * (count - len(local)), len(local)

    def _dummy_micro_batch(self, rl: bool, num_trees: int, token_weight: float) -> MicroBatch:
        """Two pad tokens, nothing trained: a rank with fewer micro-batches keeps the collectives in step.

        The tokens stay attended (a fully masked row would give NaN logits, and 0 * NaN gradients).
        """
        seq = TrainSequence([self.pad_id], [self.pad_id], sampler_logprobs=[0.0] if rl else None)
        (mb,) = make_micro_batches([seq], 2, self.pad_id)
        zero = torch.zeros_like(mb.loss_mask)
        return replace(
            mb,
            loss_mask=zero,
            weights=zero,
            num_trees=num_trees,
            total_token_weight=token_weight,
        )

    # ------------------------------------------------------------------ steps

    def _grad_norm(self) -> float:
        if self._clip_in_hook:
            return float("nan") if self._hook_grad_norm is None else self._hook_grad_norm
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def _optimizer_step(
        self, batches: Sequence[MicroBatch], num_real: int, loss_fn: Any
    ) -> dict[str, float]:
        """Forward/backward every micro-batch, then one optimizer step. Returns sums over this rank."""
        self.engine.train()
        sums: dict[str, float] = {}
        for i, mb in enumerate(batches):
            mb = mb.to(self.device)
            loss, metrics = loss_fn(token_logprobs(self.engine, mb), mb, i)
            # DeepSpeed averages gradients over ranks; the denominators are already global.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if i < num_real:
                tokens = metrics.pop("tokens")
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                sums["tokens"] = sums.get("tokens", 0.0) + tokens
                sums["seq_tokens"] = sums.get("seq_tokens", 0.0) + mb.num_real_tokens
                for k, v in metrics.items():  # token means -> token-weighted sums
                    sums[k] = sums.get(k, 0.0) + v * tokens
        self._hook_grad_norm = None
        self._step_lr = float(self.engine.get_lr()[0])  # the lr this step uses; step() moves the schedule on
        self.engine.step()
        return sums

    def _reduce(self, sums: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """Sum over ranks; token-weighted metrics back to means over the whole batch."""
        totals = dict(zip(keys, self._all_sum([sums.get(k, 0.0) for k in keys])))
        out = {"loss": totals["loss"], "tokens": totals["tokens"], "seq_tokens": totals["seq_tokens"]}
        for k in keys:
            if k not in out:
                out[k] = totals[k] / max(totals["tokens"], 1.0)
        return out

    def sft_step(self, seqs: Sequence[TrainSequence]) -> dict[str, float]:
        """One optimizer step of weighted cross-entropy on the output tokens of this rank's share."""
        t0 = time.perf_counter()
        batches, num_real = self._micro_batches(seqs, rl=False)
        sums = self._optimizer_step(batches, num_real, lambda lp, mb, i: sft_loss(lp, mb))
        out = self._reduce(sums, ["loss", "tokens", "seq_tokens", "nll"]) | {"grad_norm": self._grad_norm()}
        return self._finish(out, t0, len(batches))

    def grpo_step(self, seqs: Sequence[TrainSequence], grpo: GRPOConfig) -> dict[str, float]:
        """`grpo.inner_steps` optimizer steps of the clipped policy loss on this rank's share.

        The ratio is taken against the sampler logprobs carried by the sequences; with kl_coef > 0 the
        reference logprobs are computed once, before the first inner step.
        """
        if grpo.kl_coef > 0 and self.reference is None:
            raise ValueError(
                f"grpo.kl_coef={grpo.kl_coef} needs a reference model: set learner reference_model=true"
            )
        t0 = time.perf_counter()
        batches, num_real = self._micro_batches(seqs, rl=True)
        ref_lp: list[Tensor | None] = [None] * len(batches)
        if grpo.kl_coef > 0:
            with torch.no_grad():
                ref_lp = [token_logprobs(self.reference, mb.to(self.device)) for mb in batches]

        keys = ["loss", "tokens", "seq_tokens", "clip_frac", "ratio_mean", "approx_kl_sampler"]
        keys += ["kl_ref"] if grpo.kl_coef > 0 else []
        per_step: list[dict[str, float]] = []
        for _ in range(grpo.inner_steps):
            sums = self._optimizer_step(
                batches, num_real, lambda lp, mb, i: policy_loss(lp, mb, grpo, ref_lp[i])
            )
            per_step.append(self._reduce(sums, keys) | {"grad_norm": self._grad_norm()})
        out = {k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]}
        out["tokens"] = per_step[0]["tokens"]
        out["seq_tokens"] = per_step[0]["seq_tokens"] * len(per_step)
        out["ratio_mean_first"] = per_step[0]["ratio_mean"]  # on-policy this is 1 up to sampler/trainer drift
        out["loss_last"] = per_step[-1]["loss"]
        return self._finish(out, t0, len(batches) * len(per_step))

    def _finish(self, out: dict[str, float], t0: float, micro_batches: int) -> dict[str, float]:
        wall = time.perf_counter() - t0
        out |= {
            "lr": self._step_lr,
            "step": float(self.step),
            "micro_batches": float(micro_batches),
            "step_s": wall,
            # forward+backward tokens (prompts included, padding not) of all ranks per second
            "tokens_per_s": out["seq_tokens"] / wall if wall > 0 else 0.0,
        }
        return out

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict[str, Any] | None = None) -> str:
        """DeepSpeed checkpoint (model, optimizer, scheduler) under `ckpt_dir/step_N`; every rank calls it.

        `client_state` (e.g. the data position) comes back from load_checkpoint. Under ZeRO every rank
        writes its own partition, so ckpt_dir must be on storage all ranks share.
        """
        tag = f"step_{self.step}"
        state = {_CLIENT_KEY: {"step": self.step, "client": dict(client_state or {})}}
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
        return str(Path(ckpt_dir) / tag)

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Any]:
        """Restore the latest (or `tag`) checkpoint of `ckpt_dir`; returns the saved client_state."""
        path, state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None or state is None or _CLIENT_KEY not in state:
            raise FileNotFoundError(f"no apr-ray learner checkpoint in {ckpt_dir} (tag {tag or 'latest'})")
        if state[_CLIENT_KEY]["step"] != self.step:
            raise RuntimeError(
                f"checkpoint {path}: saved at step {state[_CLIENT_KEY]['step']}, engine restored step {self.step}"
            )
        return dict(state[_CLIENT_KEY]["client"])

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.module.named_parameters())

    def _gather_buckets(self) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
        """Parameters in groups of about _GATHER_BUCKET_BYTES (full size), in model order."""
        bucket: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        for name, p in self._named_parameters():
            numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            bucket.append((name, p))
            size += numel * p.element_size()
            if size >= _GATHER_BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full weights as CPU tensors in Hugging Face names; a collective: every rank must call it.

        Rank 0 returns the weights (training dtype: bf16 on GPU, fp32 on CPU); the other ranks an empty
        dict. Under ZeRO-3 the partitions are gathered bucket by bucket. Tied weights appear once.
        """
        import deepspeed

        out: dict[str, Tensor] = {}
        for bucket in self._gather_buckets():
            params = [p for _, p in bucket]
            with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
                if self.rank == 0:
                    for name, p in bucket:
                        out[name] = p.detach().to("cpu", copy=True)
        return out

    def export_hf(self, out_dir: str | Path) -> Path | None:
        """Write a Hugging Face model dir (safetensors, config, tokenizer files) that transformers and vLLM load.

        A collective; rank 0 writes and returns the path, the other ranks return None.
        """
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.model_dir.iterdir():  # tokenizer, generation config, ...
            if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, out / f.name)
        config = self.hf_config.__class__.from_dict(self.hf_config.to_dict())
        config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        config.save_pretrained(out)
        weights = {k: v.contiguous() for k, v in state.items()}
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
