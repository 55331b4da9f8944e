"""What the learner is told: optimizer and numerics (`LearnerConfig`) and the GRPO objective
(`GRPOConfig`). Light on purpose (pydantic only): the run config validates them without importing torch."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage; 0 is plain data parallel")
    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (after warm-up)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up over this many optimizer steps; 0: none")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after warm-up: constant, or decaying to min_lr_ratio * lr over decay_steps"
    )
    decay_steps: int = Field(
        0, ge=0, description="optimizer steps (warm-up included) at whose end the decay reaches min_lr_ratio;"
        " 0: the stage's steps (sft.steps / grpo.steps)"
    )
    decay_start: int = Field(
        0, ge=0, description="optimizer step at which the decay begins; the rate holds at lr until then"
        " (warm-up, stable, decay: WSD). 0: right after warm-up. After decay_steps the rate stays at the floor"
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the decayed learning rate, as a share of lr")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm to this; 0 disables")
    micro_batch_tokens: int = Field(
        8192, ge=1, description="padded tokens (rows x longest row) per micro-batch, SFT and GRPO alike"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 (fp32 master weights) on GPU, fp32 on CPU"
    )
    seed: int = Field(0, description="torch / python RNG seed, set once at start")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (saves memory)")
    reference_model: bool = Field(
        False, description="keep a frozen copy of the initial weights for GRPO's KL term (kl_coef > 0)"
    )
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters smaller than this (elements) unpartitioned"
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 leaves torch's default")
    dist_timeout_s: int = Field(1800, ge=1, description="timeout of collective operations")


    def lr_multiplier(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) as a share of `lr`.

        Warm-up is linear and never gives a zero step; a decay must know its length (`decay_steps`)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        decay_from = max(self.warmup_steps, self.decay_start)
        if self.decay_steps <= decay_from:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} needs decay_steps > max(warmup_steps, decay_start) "
                             f"({decay_from}), got {self.decay_steps}")
        progress = min(1.0, max(0.0, (step - decay_from) / (self.decay_steps - decay_from)))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(5, ge=1, description="samples per problem; advantages are centred per group")
    normalize_adv_std: bool = Field(
        False,
        description="divide advantages by the group std; off by default: with it the small critical-path"
        " bonus is blown up to unit scale when a whole group is correct",
    )
    std_eps: float = Field(1e-6, gt=0.0, description="added to the group std before dividing")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="ratio clipped to [1 - clip_eps, 1 + clip_high]")
    clip_eps_high: float | None = Field(
        None, gt=0.0, description="upper clip (DAPO's clip-higher, ThreadWeaver used 0.28); None: clip_eps"
    )
    kl_coef: float = Field(
        0.001, ge=0.0, description="k3 KL to a frozen reference; 0 disables it and no reference is needed"
    )
    loss_norm: Literal["tree_mean", "constant"] = Field(
        "tree_mean",
        description="tree_mean: each sequence's token mean, weighted 1/threads of its tree (TinyRL); constant:"
        " every output token of a tree summed, divided by loss_norm_tokens (Dr. GRPO: no length bias)",
    )
    loss_norm_tokens: int = Field(
        1024, ge=1, description="the constant divisor of loss_norm=constant (the rollout's max_tokens is natural)"
    )
    inner_steps: int = Field(2, ge=1, description="optimizer steps per rollout batch, each a full pass")
    drop_zero_adv_groups: bool = Field(
        False,
        description="train no sequence of a group whose rewards are all equal (its advantages are 0);"
        " saves compute, but with kl_coef > 0 their KL term is dropped too",
    )

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
