"""GRPO on thread trees: group advantages, advantage broadcast, micro-batches, the losses.

Owns the math between scored trees and a scalar loss. Pure torch: must not import Ray, DeepSpeed,
vLLM or the rollout runtime; the learner owns models, optimizers and devices.

Conventions
- Every per-token tensor of a `MicroBatch` is [B, T] and indexed by the token it concerns: position t
  holds the mask / advantage / sampler logprob of `input_ids[:, t]`. The causal shift (logits at t-1
  predict token t) happens once, in `token_logprobs`; position 0 is never scored.
- Only output tokens (what the sampler chose) are trained. Prompts, child prompts and the
  runtime-written join blocks (part of a continuation's prompt) and padding have loss_mask 0.
- Policy-loss normalisation (`GRPOConfig.loss_norm`), divided by the number of trees in the whole batch
  either way, so the losses of the micro-batches of one batch add up to the full-batch loss:
  - tree_mean, as in TinyRL (shared/research/apr.md §5): per sequence a masked mean over its output
    tokens, times its weight (1 / sequences kept from its tree). Every tree counts equally whatever its
    length, which is the known GRPO length bias: a token of a long wrong thread, or of a wrong tree with
    many threads, is pushed down less than one of a short one, so negative advantages favour longer trees.
  - constant (Dr. GRPO): every output token of the tree summed, divided by a constant; each token of a
    wrong tree is pushed down equally hard, whatever the length or thread count of its tree.

Departures from TinyRL
- The ratio is taken against the sampler's own logprobs (TinyRL recomputes "old" logprobs with the
  trainer model and ignores the sampler's), so sampler/trainer mismatch is corrected, not hidden.
- The KL term is weighted like the policy term (1 / sequences of the tree); TinyRL divides it only by
  the batch's sequence count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from apr_ray.learner.config import GRPOConfig
from apr_ray.types import EndReason, TrainSequence, TreeRecord


# ---------------------------------------------------------------- advantages and broadcast


def _groups(rewards: Sequence[float], group_size: int) -> list[list[float]]:
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of group_size={group_size}")
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise ValueError(f"reward {i} is {r}: rewards must be finite")
    return [[float(r) for r in rewards[s : s + group_size]] for s in range(0, len(rewards), group_size)]


def group_advantages(
    rewards: Sequence[float], group_size: int, normalize_std: bool = False, eps: float = 1e-6,
    valid: Sequence[bool] | None = None,
) -> list[float]:
    """A = r - mean(group), optionally / (population std + eps). Consecutive rewards form a group.

    `valid[i]` False leaves tree i out of its group (its advantage is 0, its reward is not in the mean):
    a tree that a fault ended (`faulted`) says nothing about the policy."""
    if valid is not None and len(valid) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(valid)} valid flags")
    out: list[float] = []
    for g, group in enumerate(_groups(rewards, group_size)):
        ok = [True] * group_size if valid is None else list(valid[g * group_size : (g + 1) * group_size])
        kept = [r for r, v in zip(group, ok) if v]
        if len(kept) < 2 or max(kept) == min(kept):  # exact zeros, not float residue of r - mean
            out.extend([0.0] * group_size)
            continue
        mean = sum(kept) / len(kept)
        centred = [r - mean if v else 0.0 for r, v in zip(group, ok)]
        if normalize_std:
            std = math.sqrt(sum((r - mean) ** 2 for r in kept) / len(kept))
            centred = [c / (std + eps) for c in centred]
        out.extend(centred)
    return out


def flat_groups(rewards: Sequence[float], group_size: int, valid: Sequence[bool] | None = None) -> list[bool]:
    """Per tree: True when its group has nothing to learn from: every valid reward equal, or fewer than two
    valid trees."""
    flags: list[bool] = []
    for g, group in enumerate(_groups(rewards, group_size)):
        kept = [r for i, r in enumerate(group) if valid is None or valid[g * group_size + i]]
        flags.extend([len(kept) < 2 or max(kept) == min(kept)] * group_size)
    return flags


def faulted(tree: TreeRecord) -> bool:
    """Whether a fault outside the model ended one of the tree's requests: the engine failed (ERROR) or the
    tree's wall-clock limit cancelled it (TIMEOUT, a property of the machine's load, not of the tokens)."""
    return any(r.end_reason in (EndReason.ERROR, EndReason.TIMEOUT) for r in tree.threads)


def trees_to_sequences(
    trees: Sequence[TreeRecord], advantages: Sequence[float], keep: Sequence[bool] | None = None
) -> list[TrainSequence]:
    """Every engine request of a tree becomes a sequence carrying the tree's advantage.

    Records with no output tokens are skipped; weight = 1 / (sequences kept from the tree), so a
    tree's weights sum to 1. `keep[i]` False drops tree i altogether. tree_index is the position in `trees`.
    """
    if len(advantages) != len(trees) or (keep is not None and len(keep) != len(trees)):
        raise ValueError(
            f"{len(trees)} trees but {len(advantages)} advantages"
            + ("" if keep is None else f" and {len(keep)} keep flags")
        )
    seqs: list[TrainSequence] = []
    for i, (tree, adv) in enumerate(zip(trees, advantages)):
        if keep is not None and not keep[i]:
            continue
        records = [r for r in tree.threads if r.output_ids]
        for r in records:
            if len(r.logprobs) != len(r.output_ids):
                raise ValueError(
                    f"tree {i} ({tree.problem_id!r}) request {r.request_id}: {len(r.logprobs)} logprobs"
                    f" for {len(r.output_ids)} output tokens"
                )
            seqs.append(
                TrainSequence(
                    prompt_ids=r.prompt_ids,
                    output_ids=r.output_ids,
                    advantage=float(adv),
                    weight=1.0 / len(records),
                    sampler_logprobs=r.logprobs,
                    tree_index=i,
                )
            )
    return seqs


def prepare_sequences(
    trees: Sequence[TreeRecord], rewards: Sequence[float], cfg: GRPOConfig
) -> list[TrainSequence]:
    """Rewards of consecutive groups of `cfg.group_size` trees -> training sequences.

    A faulted tree (`faulted`) is dropped, not its group: the group's other samples are still on-policy
    samples of the same problem, so they keep their signal against the mean of the healthy ones; a fault
    scored as a wrong answer would push down the tokens that came before it."""
    valid = [not faulted(t) for t in trees]
    advantages = group_advantages(rewards, cfg.group_size, cfg.normalize_adv_std, cfg.std_eps, valid=valid)
    flat = flat_groups(rewards, cfg.group_size, valid) if cfg.drop_zero_adv_groups else [False] * len(trees)
    keep = [v and not f for v, f in zip(valid, flat)]
    return trees_to_sequences(trees, advantages, keep)


# ---------------------------------------------------------------- micro-batches


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, T] long, right-padded with pad_id
    attention_mask: Tensor  # [B, T] long, 1 on real tokens
    loss_mask: Tensor  # [B, T] float, 1 on output tokens only
    advantages: Tensor  # [B, T] float, the sequence's advantage on its output tokens, else 0
    old_logprobs: Tensor | None  # [B, T] float, sampler logprob on output tokens, else 0; None for SFT
    weights: Tensor  # [B, T] float, the sequence's weight on its output tokens, else 0
    seq_index: Tensor  # [B] long, position of each row in the sequence list given to make_micro_batches
    tree_index: Tensor  # [B] long, TrainSequence.tree_index of each row
    num_trees: int  # trees in the whole batch (all micro-batches): the policy-loss denominator
    total_token_weight: float  # sum of weight over output tokens of the whole batch: the SFT denominator

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


def _check_sequences(seqs: Sequence[TrainSequence]) -> None:
    with_lp = [s.sampler_logprobs is not None for s in seqs]
    if any(with_lp) and not all(with_lp):
        raise ValueError(
            f"sequence {with_lp.index(False)} has no sampler_logprobs but others do: do not mix SFT and RL"
        )
    for i, s in enumerate(seqs):
        if not s.prompt_ids or not s.output_ids:
            raise ValueError(
                f"sequence {i} (tree {s.tree_index}): needs a non-empty prompt and output, got"
                f" {len(s.prompt_ids)} prompt and {len(s.output_ids)} output tokens"
            )
        if s.sampler_logprobs is not None and len(s.sampler_logprobs) != len(s.output_ids):
            raise ValueError(
                f"sequence {i} (tree {s.tree_index}): {len(s.sampler_logprobs)} sampler logprobs"
                f" for {len(s.output_ids)} output tokens"
            )
        if not s.weight > 0:
            raise ValueError(f"sequence {i} (tree {s.tree_index}): weight {s.weight} must be > 0")


# What one more micro-batch costs beyond its padded tokens (a forward/backward launch, the optimizer's
# gradient accumulation), in token-equivalents: it keeps the packer from cutting a batch into slivers.
MICRO_BATCH_OVERHEAD_TOKENS = 256


def _pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches (lists of row indices) of at most `max_tokens` padded tokens (rows x longest row),
    with the least padded tokens + MICRO_BATCH_OVERHEAD_TOKENS per micro-batch.

    Rows sorted longest first are cut into consecutive runs by dynamic programming: a run is padded to
    its first (longest) row. Demonstration batches mix 50- and 900-token threads, so one greedy run padded
    to the longest row wasted ~65% of the compute (measured on the tiny preset's demos). A sequence longer
    than the budget gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of packing the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # the run order[i:j], padded to lengths[order[i]]
            width = lengths[order[i]]
            if (j - i) * width > max_tokens and j - i > 1:
                break
            cost = best[i] + (j - i) * width + MICRO_BATCH_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def _collate(
    seqs: Sequence[TrainSequence], rows: list[int], pad_id: int, num_trees: int, total_token_weight: float
) -> MicroBatch:
    width = max(len(seqs[i].prompt_ids) + len(seqs[i].output_ids) for i in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    loss_mask, advantages, weights = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    has_lp = seqs[rows[0]].sampler_logprobs is not None
    old_logprobs = torch.zeros(shape) if has_lp else None
    for b, i in enumerate(rows):
        s = seqs[i]
        p, n = len(s.prompt_ids), len(s.output_ids)
        input_ids[b, : p + n] = torch.tensor(list(s.prompt_ids) + list(s.output_ids), dtype=torch.long)
        attention_mask[b, : p + n] = 1
        loss_mask[b, p : p + n] = 1.0
        advantages[b, p : p + n] = s.advantage
        weights[b, p : p + n] = s.weight
        if old_logprobs is not None:
            old_logprobs[b, p : p + n] = torch.tensor(s.sampler_logprobs, dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        advantages=advantages,
        old_logprobs=old_logprobs,
        weights=weights,
        seq_index=torch.tensor(rows, dtype=torch.long),
        tree_index=torch.tensor([seqs[i].tree_index for i in rows], dtype=torch.long),
        num_trees=num_trees,
        total_token_weight=total_token_weight,
    )


def make_micro_batches(
    seqs: Sequence[TrainSequence],
    max_tokens_per_micro_batch: int,
    pad_id: int,
    num_trees: int | None = None,
) -> list[MicroBatch]:
    """Pack sequences into right-padded micro-batches of at most `max_tokens_per_micro_batch` padded tokens.

    num_trees (the policy-loss denominator) defaults to the distinct tree_index values in `seqs`, a
    sequence with tree_index < 0 counting as a tree of its own. Pass it explicitly when the batch is
    split over data-parallel learners and the denominator must be the global one.
    """
    if not seqs:
        return []
    _check_sequences(seqs)
    if num_trees is None:
        num_trees = len({s.tree_index for s in seqs if s.tree_index >= 0})
        num_trees += sum(1 for s in seqs if s.tree_index < 0)
    total_token_weight = sum(s.weight * len(s.output_ids) for s in seqs)
    lengths = [len(s.prompt_ids) + len(s.output_ids) for s in seqs]
    return [
        _collate(seqs, rows, pad_id, num_trees, total_token_weight)
        for rows in _pack(lengths, max_tokens_per_micro_batch)
    ]


def padding_fraction(batches: Sequence[MicroBatch]) -> float:
    """Share of the padded [B, T] slots that hold padding, over all micro-batches."""
    slots = sum(mb.input_ids.numel() for mb in batches)
    return 0.0 if slots == 0 else 1.0 - sum(mb.num_real_tokens for mb in batches) / slots


# ---------------------------------------------------------------- logprobs and losses


def token_logprobs(model: torch.nn.Module, mb: MicroBatch) -> Tensor:
    """[B, T] float32: log p(input_ids[:, t] | input_ids[:, :t]) at t >= 1, 0 at t = 0.

    Works with any causal LM returning `.logits` [B, T, V] (HF style). Rows are scored one at a
    time so the float32 copy of the logits is [T, V], not [B, T, V] (under no_grad it is freed at
    once; with grad autograd keeps what backward needs). gather - logsumexp avoids materialising a
    full log_softmax.
    """
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    targets = mb.input_ids[:, 1:]
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b, :-1].float()  # logits at t-1 predict token t
        picked = row.gather(-1, targets[b].unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.nn.functional.pad(torch.stack(rows), (1, 0))


def _token_mean(x: Tensor, mask: Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def policy_loss(
    new_logprobs: Tensor, mb: MicroBatch, cfg: GRPOConfig, ref_logprobs: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clipped GRPO loss of one micro-batch (+ kl_coef * k3 KL to the reference).

    Summing the returned losses over the micro-batches of a batch gives the batch loss. Metrics are
    token means over this micro-batch's output tokens; `tokens` lets the caller combine them.
    """
    if mb.old_logprobs is None:
        raise ValueError("policy_loss needs sampler logprobs, and this micro-batch has none (SFT sequences?)")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={cfg.kl_coef} needs ref_logprobs; set kl_coef=0 to train without a reference"
        )
    mask = mb.loss_mask
    log_ratio = (new_logprobs - mb.old_logprobs) * mask  # 0 off the output tokens keeps exp() finite
    ratio = torch.exp(log_ratio)
    unclipped = ratio * mb.advantages
    clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_high) * mb.advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None:
        d = (ref_logprobs - new_logprobs) * mask
        kl = torch.exp(d) - d - 1.0  # k3 estimator of KL(policy || reference), >= 0
        if cfg.kl_coef > 0:
            per_token = per_token + cfg.kl_coef * kl
    if cfg.loss_norm == "tree_mean":
        seq_loss = (per_token * mask * mb.weights).sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        seq_loss = (per_token * mask).sum(-1) / cfg.loss_norm_tokens
    loss = seq_loss.sum() / mb.num_trees

    with torch.no_grad():
        metrics = {
            "clip_frac": _token_mean((clipped < unclipped).float(), mask),
            "ratio_mean": _token_mean(ratio, mask),
            "approx_kl_sampler": _token_mean(ratio - 1.0 - log_ratio, mask),  # k3 of KL(sampler || policy)
            "tokens": float(mask.sum()),
        }
        if kl is not None:
            metrics["kl_ref"] = _token_mean(kl, mask)
    return loss, metrics


def sft_loss(new_logprobs: Tensor, mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
    """Weighted token-mean cross-entropy over the output tokens of the whole batch.

    The denominator is the batch-wide `total_token_weight`, so long demonstrations count in
    proportion to their tokens and micro-batch losses add up exactly to the batch loss.
    """
    mask = mb.loss_mask
    loss = -(new_logprobs * mask * mb.weights).sum() / mb.total_token_weight
    with torch.no_grad():
        metrics = {"nll": _token_mean(-new_logprobs, mask), "tokens": float(mask.sum())}
    return loss, metrics
