"""The learner in one process (world size 1, CPU, fp32), and the pure parts of the weight sync.

Every learner here shares the pytest process's gloo group of size 1 and a tiny model with the
project's tokenizer, so a run takes seconds.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from apr_ray.grpo import GRPOConfig, make_micro_batches, token_logprobs
from apr_ray.learner.actor import split_by_tree
from apr_ray.learner.engine import Learner, LearnerConfig
from apr_ray.modeling import ModelConfig, init_model, save_pretrained
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TrainSequence
from apr_ray.weight_sync import WeightHandle, WeightReceiver, WeightTransport, from_wire, to_wire

TINY = ModelConfig(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(init_model(TINY, tok), tok, out)
    return out


def learner_cfg(**kw) -> LearnerConfig:
    base = dict(lr=3e-3, torch_threads=1, micro_batch_tokens=32, zero3_param_persistence_threshold=0)
    return LearnerConfig(**(base | kw))


def random_seqs(n: int, seed: int, prompt: int = 4, output: int = 12) -> list[TrainSequence]:
    rng = random.Random(seed)
    return [
        TrainSequence(
            [rng.randrange(4, 1000) for _ in range(prompt)], [rng.randrange(4, 1000) for _ in range(output)]
        )
        for _ in range(n)
    ]


def seq_logprob(learner: Learner, seq: TrainSequence) -> float:
    """Summed logprob of the output tokens under the learner's current weights."""
    (mb,) = make_micro_batches([seq], 10**6, learner.pad_id)
    with torch.no_grad():
        return float(token_logprobs(learner.module, mb)[0, len(seq.prompt_ids) :].sum())


def with_sampler_logprobs(learner: Learner, seqs, advantages) -> list[TrainSequence]:
    """On-policy RL sequences: sampler logprobs are the learner's own, one tree per sequence."""
    out = []
    for i, (s, adv) in enumerate(zip(seqs, advantages)):
        (mb,) = make_micro_batches([s], 10**6, learner.pad_id)
        with torch.no_grad():
            lp = token_logprobs(learner.module, mb)[0, len(s.prompt_ids) :].tolist()
        out.append(TrainSequence(s.prompt_ids, s.output_ids, advantage=adv, sampler_logprobs=lp, tree_index=i))
    return out


def test_sft_overfits_a_small_batch(model_dir):
    learner = Learner(learner_cfg(lr=1e-2), model_dir)
    seqs = random_seqs(4, seed=0)  # 2 micro-batches of 2 x 16 tokens: accumulation is exercised
    first = learner.sft_step(seqs)
    assert first["micro_batches"] == 2 and first["tokens"] == 48
    for _ in range(80):
        last = learner.sft_step(seqs)
    assert first["loss"] > 5.0  # ~ln(vocab) at random init
    assert last["loss"] < 0.05, last
    assert last["step"] == 81 and last["tokens_per_s"] > 0 and last["grad_norm"] > 0


def test_lr_schedules_warm_up_then_decay_to_the_floor():
    cosine = LearnerConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine", decay_steps=14, min_lr_ratio=0.1)
    assert [cosine.lr_multiplier(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # no zero-lr step
    assert cosine.lr_multiplier(9) == pytest.approx(0.55)  # halfway through the decay
    assert cosine.lr_multiplier(14) == cosine.lr_multiplier(1000) == pytest.approx(0.1)
    linear = cosine.model_copy(update={"lr_schedule": "linear"})
    assert linear.lr_multiplier(6) == pytest.approx(1.0 - 0.9 * 2 / 10)
    constant = cosine.model_copy(update={"lr_schedule": "constant"})
    assert constant.lr_multiplier(1000) == 1.0
    with pytest.raises(ValueError, match="decay_steps"):
        LearnerConfig(lr_schedule="cosine", warmup_steps=5).lr_multiplier(10)
    # warm-up, stable, decay: full rate until decay_start, a linear ramp to the floor, then the floor
    wsd = LearnerConfig(lr=1.0, warmup_steps=2, lr_schedule="linear", decay_start=10, decay_steps=20,
                        min_lr_ratio=0.15)
    assert [wsd.lr_multiplier(s) for s in (0, 1, 2, 9, 10)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert wsd.lr_multiplier(15) == pytest.approx(1.0 - 0.85 / 2)
    assert wsd.lr_multiplier(20) == wsd.lr_multiplier(5000) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="decay_start"):
        wsd.model_copy(update={"decay_start": 20}).lr_multiplier(5)


def test_the_learner_follows_the_schedule(model_dir):
    cfg = learner_cfg(lr=1e-2, warmup_steps=2, lr_schedule="linear", decay_steps=6, min_lr_ratio=0.0)
    learner = Learner(cfg, model_dir)
    lrs = [learner.sft_step(random_seqs(2, seed=i))["lr"] for i in range(7)]
    assert lrs == pytest.approx([1e-2 * cfg.lr_multiplier(k) for k in range(7)], abs=1e-12)
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] == 0.0


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(model_dir, tmp_path, stage):
    batches = [random_seqs(3, seed=100 + i) for i in range(6)]  # the "data position" selects the batch
    # the resumed steps are still warming up, and then decay: the schedule's position is restored
    cfg = learner_cfg(zero_stage=stage, warmup_steps=2, lr_schedule="cosine", decay_steps=6)

    straight = Learner(cfg, model_dir)
    expected = [straight.sft_step(b)["loss"] for b in batches]

    first = Learner(cfg, model_dir)
    before = [first.sft_step(b)["loss"] for b in batches[:3]]
    first.save_checkpoint(tmp_path / "ckpt", client_state={"data_position": 3})
    first.sft_step(batches[5])  # steps after the checkpoint must not leak into the resumed run

    resumed = Learner(cfg, model_dir)
    state = resumed.load_checkpoint(tmp_path / "ckpt")
    assert state == {"data_position": 3} and resumed.step == 3
    after = [resumed.sft_step(b)["loss"] for b in batches[state["data_position"] :]]
    assert before + after == pytest.approx(expected, rel=0, abs=1e-6)


def test_load_checkpoint_of_an_empty_dir_names_it(model_dir, tmp_path):
    learner = Learner(learner_cfg(), model_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        learner.load_checkpoint(tmp_path)


def test_export_hf_reloads_with_identical_logits(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = Learner(learner_cfg(), model_dir)
    for b in (random_seqs(3, seed=1), random_seqs(3, seed=2)):
        learner.sft_step(b)
    out = learner.export_hf(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 17, 300, 42, 999, 5, 6]])
    with torch.no_grad():
        expected = learner.module(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(initial, expected, atol=1e-3)  # the export holds the trained weights
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("Current State: 24:[3, 8]")) == "Current State: 24:[3, 8]"


def test_zero3_full_state_dict_equals_stage0_after_the_same_steps(model_dir):
    batches = [random_seqs(3, seed=7), random_seqs(2, seed=8)]
    states = []
    for stage in (0, 3):
        learner = Learner(learner_cfg(zero_stage=stage), model_dir)
        for b in batches:
            learner.sft_step(b)
        states.append(learner.full_state_dict())
    plain, gathered = states
    assert plain.keys() == gathered.keys() and "model.embed_tokens.weight" in plain
    for name in plain:
        assert gathered[name].shape == plain[name].shape, name  # a ZeRO-3 partition would be flat
        torch.testing.assert_close(gathered[name], plain[name], rtol=0, atol=1e-5)  # float noise of two Adam paths


def test_gradient_checkpointing_changes_nothing_but_memory(model_dir):
    seqs = random_seqs(4, seed=11)
    plain = Learner(learner_cfg(), model_dir).sft_step(seqs)
    ckpt = Learner(learner_cfg(gradient_checkpointing=True), model_dir).sft_step(seqs)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_trains_and_exports_bf16(model_dir, tmp_path, stage):
    """The GPU default (bf16 weights, fp32 optimizer masters), run on the CPU."""
    import json

    learner = Learner(learner_cfg(zero_stage=stage, precision="bf16", lr=1e-2), model_dir)
    seqs = random_seqs(4, seed=12)
    losses = [learner.sft_step(seqs)["loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0] and math.isfinite(learner.sft_step(seqs)["grad_norm"])
    state = learner.full_state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    out = learner.export_hf(tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_grpo_step_raises_positive_and_lowers_negative_advantage_sequences(model_dir, kl_coef):
    learner = Learner(learner_cfg(reference_model=kl_coef > 0), model_dir)
    seqs = with_sampler_logprobs(learner, random_seqs(4, seed=3), advantages=[1.0, -1.0, 1.0, -1.0])
    before = [seq_logprob(learner, s) for s in seqs]
    grpo = GRPOConfig(kl_coef=kl_coef, inner_steps=3)
    metrics = learner.grpo_step(seqs, grpo)
    after = [seq_logprob(learner, s) for s in seqs]
    assert [a > b for a, b in zip(after, before)] == [True, False, True, False]
    assert metrics["ratio_mean_first"] == pytest.approx(1.0, abs=1e-5)  # on-policy first pass
    assert metrics["step"] == 3 and metrics["micro_batches"] == 3 * 2
    assert ("kl_ref" in metrics) == (kl_coef > 0)
    if kl_coef > 0:
        assert 0 < metrics["kl_ref"] < 1.0  # 0 on the first inner step, then the policy moves off the reference


def test_grpo_step_refuses_inconsistent_settings(model_dir):
    learner = Learner(learner_cfg(), model_dir)
    seqs = with_sampler_logprobs(learner, random_seqs(2, seed=4), advantages=[1.0, -1.0])
    with pytest.raises(ValueError, match="reference_model"):
        learner.grpo_step(seqs, GRPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        learner.grpo_step(random_seqs(2, seed=5), GRPOConfig(kl_coef=0.0))
    with pytest.raises(ValueError, match="demonstrations"):
        learner.sft_step(seqs)


def test_learner_config_rejects_unknown_keys_and_bad_stage():
    with pytest.raises(ValueError, match="zero_stge"):
        LearnerConfig(zero_stge=3)
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerConfig(zero_stage=4)


# ---------------------------------------------------------------- batch split and weight wire format


def test_split_by_tree_keeps_trees_whole_and_balances_tokens():
    seqs = [TrainSequence([1] * 10, [2] * 10, tree_index=t) for t in (0, 0, 0, 1, 2, 2, 3)]
    seqs += [TrainSequence([1] * 5, [2] * 5) for _ in range(2)]  # demonstrations: units of their own
    shares = split_by_tree(seqs, 2)
    assert sorted(id(s) for share in shares for s in share) == sorted(id(s) for s in seqs)
    for t in range(4):
        assert sum(any(s.tree_index == t for s in share) for share in shares) == 1
    loads = [sum(len(s.prompt_ids) + len(s.output_ids) for s in share) for share in shares]
    assert loads == [80, 80]


def test_wire_format_round_trips_dtypes_and_shapes():
    state = {
        "a": torch.randn(3, 5),
        "b": torch.randn(4, 2).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(1, 2, 3),
        "d": torch.randn(8, 8)[:, ::2],  # not contiguous
    }
    back = dict(from_wire(to_wire(state)))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


class _InMemoryTransport(WeightTransport):
    def publish(self, state_dict, version):
        return WeightHandle(version, len(state_dict), 0, ref=to_wire(state_dict))

    def receive(self, handle):
        return from_wire(handle.ref)


def test_receiver_applies_versions_in_order_and_never_rolls_back():
    loaded = []
    receiver = WeightReceiver(_InMemoryTransport(), lambda named, v: loaded.append((v, dict(named)["w"].item())))
    t = receiver.transport
    h1, h2, h3 = (t.publish({"w": torch.tensor([float(v)])}, v) for v in (1, 2, 3))
    assert receiver.apply(h2) and not receiver.apply(h1) and not receiver.apply(h2) and receiver.apply(h3)
    assert loaded == [(2, 2.0), (3, 3.0)] and receiver.version == 3
