"""Two learner actors forming one DeepSpeed process group (gloo on CPU), ZeRO-2 and ZeRO-3.

The batch is split over the two ranks; the result must be the same as one rank given the whole batch
(the loss denominators are global and the gradient average is undone), and both ranks must hold the
same weights afterwards.
"""

from __future__ import annotations

import random

import pytest
import ray
import torch
from safetensors.torch import load_file

from apr_ray.grpo import GRPOConfig
from apr_ray.learner.actor import LearnerGroup
from apr_ray.learner.engine import LearnerConfig
from apr_ray.modeling import ModelConfig, init_model, save_pretrained
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TrainSequence
from apr_ray.weight_sync import ObjectStoreTransport

pytestmark = pytest.mark.ray

TINY = ModelConfig(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
GRPO = GRPOConfig(kl_coef=0.05, inner_steps=2)


def cfg(stage: int) -> LearnerConfig:
    return LearnerConfig(
        zero_stage=stage,
        lr=3e-3,
        torch_threads=1,
        micro_batch_tokens=32,
        reference_model=True,
        zero3_param_persistence_threshold=0,  # partition even this tiny model's weights
    )


def sft_batch() -> list[TrainSequence]:
    rng = random.Random(0)
    # uneven lengths: the two ranks get different numbers of micro-batches (dummies keep them in step)
    return [
        TrainSequence([rng.randrange(4, 1000) for _ in range(4)], [rng.randrange(4, 1000) for _ in range(n)])
        for n in (28, 12, 12, 10, 6)
    ]


def grpo_batch() -> list[TrainSequence]:
    rng = random.Random(1)
    seqs = []
    for tree in range(4):
        for _ in range(1 + tree % 2):  # trees of 1 and 2 threads: weights 1 and 1/2
            n = rng.randrange(5, 12)
            seqs.append(
                TrainSequence(
                    [rng.randrange(4, 1000) for _ in range(4)],
                    [rng.randrange(4, 1000) for _ in range(n)],
                    advantage=(-1.0) ** tree,
                    weight=1.0 / (1 + tree % 2),
                    sampler_logprobs=[-7.0] * n,  # ~uniform over the vocabulary, like the fresh model
                    tree_index=tree,
                )
            )
    return seqs


def gathered_on_every_rank(group: LearnerGroup) -> list[dict[str, torch.Tensor]]:
    """Each rank's view of the full weights (ZeRO-3: gathered there), to check the ranks agree."""

    def full(worker):
        import deepspeed

        learner = worker.learner
        out = {}
        for name, p in learner.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=learner.cfg.zero_stage == 3):
                out[name] = p.detach().clone()
        return out

    return ray.get([a.__ray_call__.remote(full) for a in group.actors])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(init_model(TINY, tok), tok, out)
    return out


@pytest.fixture(scope="module")
def single_rank_result(ray_cluster, model_dir):
    """What one rank given the whole batch computes: metrics of an SFT and a GRPO step, final weights."""
    group = LearnerGroup(cfg(0), model_dir, num_learners=1)
    try:
        sft = group.sft_step(sft_batch())
        grpo = group.grpo_step(grpo_batch(), GRPO)
        return sft, grpo, group.full_state_dict()
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank_and_agree(ray_cluster, model_dir, single_rank_result, stage, tmp_path):
    ref_sft, ref_grpo, ref_state = single_rank_result
    group = LearnerGroup(cfg(stage), model_dir, num_learners=2)
    try:
        sft = group.sft_step(sft_batch())
        grpo = group.grpo_step(grpo_batch(), GRPO)
        # same loss, tokens and gradient norm as one rank holding the whole batch
        for key in ("loss", "tokens", "grad_norm"):
            assert sft[key] == pytest.approx(ref_sft[key], rel=1e-5), key
        for key in ("loss", "tokens", "grad_norm", "kl_ref", "clip_frac"):
            assert grpo[key] == pytest.approx(ref_grpo[key], rel=1e-4, abs=1e-6), key

        rank0, rank1 = gathered_on_every_rank(group)
        full = group.full_state_dict()
        initial = load_file(str(model_dir / "model.safetensors"))
        assert full.keys() == ref_state.keys()
        for name, ref in ref_state.items():
            assert torch.equal(rank0[name], rank1[name]), name
            assert torch.equal(full[name], rank0[name]), name
            # the same update as one rank's (compared as a whole: Adam turns float noise in a
            # near-zero gradient into a +-lr step for that element)
            update, ref_update = full[name] - initial[name], ref - initial[name]
            assert (update - ref_update).norm() <= 1e-2 * ref_update.norm(), name

        # the object-store transport carries exactly what the group gathered
        handle = group.publish_weights(ObjectStoreTransport(), version=1)
        received = dict(ObjectStoreTransport().receive(handle))
        assert handle.version == 1 and received.keys() == full.keys()
        assert all(torch.equal(received[k], full[k]) for k in full)

        # a share one rank rejects fails the step on every rank (none is left waiting in a collective)
        with pytest.raises(ValueError, match="non-empty prompt and output|rejected their share"):
            group.sft_step(sft_batch() + [TrainSequence([5, 6], [])])
        assert group.sft_step(sft_batch())["step"] == 4  # 1 SFT + 2 GRPO steps before, the failed one took none

        if stage == 3:  # a partitioned checkpoint round-trips through both ranks
            saved = group.full_state_dict()
            group.save_checkpoint(tmp_path / "ckpt", client_state={"data_position": 7})
            group.sft_step(sft_batch())
            assert group.load_checkpoint(tmp_path / "ckpt") == {"data_position": 7}
            restored = group.full_state_dict()
            assert all(torch.equal(restored[k], saved[k]) for k in saved)
    finally:
        group.shutdown()


def test_a_rank_that_dies_fails_the_step_at_once_naming_it(ray_cluster, model_dir):
    """Rank 1 is killed; rank 0's step would wait for it in an all-reduce for learner.dist_timeout_s."""
    import time

    from apr_ray.learner.actor import LearnerDied

    group = LearnerGroup(cfg(2).model_copy(update={"dist_timeout_s": 600}), model_dir, num_learners=2,
                         num_cpus_per_learner=0.5)
    try:
        group.sft_step(sft_batch())  # both ranks up and in step
        ray.kill(group.actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(LearnerDied, match=r"learner rank 1 of 2 died during an SFT step"):
            group.sft_step(sft_batch())
        assert time.monotonic() - start < 120  # not the 600 s collective timeout
        assert group.actors == []  # the group is stopped: rank 0 does not linger in its collective
    finally:
        group.shutdown()
