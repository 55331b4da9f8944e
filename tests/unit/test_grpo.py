"""GRPO math by hand: advantages, broadcast and weights, masks and the causal shift, packing,
the clipped loss and KL, micro-batch exactness, and one real learning step on a tiny Llama."""

import math
import random

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from apr_ray.grpo import (
    GRPOConfig,
    flat_groups,
    group_advantages,
    make_micro_batches,
    padding_fraction,
    policy_loss,
    prepare_sequences,
    sft_loss,
    token_logprobs,
    trees_to_sequences,
)
from apr_ray.types import EndReason, ThreadRecord, TrainSequence, TreeMetrics, TreeRecord

torch.set_num_threads(1)
VOCAB = 32


def rec(i: int, prompt: list[int], output: list[int], logprobs: list[float] | None = None) -> ThreadRecord:
    return ThreadRecord(
        request_id=i, thread_id=i, parent_thread_id=-1 if i == 0 else 0, depth=int(i > 0), segment=0,
        prompt_ids=prompt, output_ids=output,
        logprobs=[-1.0] * len(output) if logprobs is None else logprobs, end_reason=EndReason.EOS,
    )


def tree_of(*records: ThreadRecord) -> TreeRecord:
    n = sum(len(r.output_ids) for r in records)
    metrics = TreeMetrics(n, n, len(records), len(records), 0, 0, 0.0)
    return TreeRecord(24, [1, 2, 3, 4], list(records), metrics, None, False, problem_id="p")


def with_token_values(mb, values: list[float]) -> torch.Tensor:
    """[B, T] tensor holding `values` on the output tokens of row 0, 0 elsewhere."""
    out = torch.zeros(mb.loss_mask.shape)
    out[0, mb.loss_mask[0].bool()] = torch.tensor(values)
    return out


# ---------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    adv = group_advantages([1, 0, 0, 1.2, 0.5, 0.5], group_size=3)
    assert adv == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.7 - 0.7 / 3, -0.7 / 3, -0.7 / 3])


def test_group_advantages_std_option():
    # centred [2/3, -1/3, -1/3]; population std = sqrt(2)/3 -> [sqrt 2, -1/sqrt 2, -1/sqrt 2]
    adv = group_advantages([1, 0, 0], group_size=3, normalize_std=True, eps=1e-6)
    assert adv == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-5)


def test_flat_group_gives_exact_zeros():
    # 0.1 * 3 / 3 != 0.1 in floats: the residue must not leak out as a tiny advantage
    assert group_advantages([0.1, 0.1, 0.1, 1, 0, 1], 3)[:3] == [0.0, 0.0, 0.0]
    assert group_advantages([0.1, 0.1, 0.1], 3, normalize_std=True) == [0.0, 0.0, 0.0]
    assert flat_groups([0.1, 0.1, 0.1, 1, 0, 1], 3) == [True] * 3 + [False] * 3


def test_bad_group_length_names_the_sizes():
    with pytest.raises(ValueError, match="7 rewards do not split into groups of group_size=5"):
        group_advantages([0.0] * 7, group_size=5)
    with pytest.raises(ValueError, match="reward 1 is nan"):
        group_advantages([0.0, float("nan")], group_size=2)


# ---------------------------------------------------------------- broadcast and weights


def test_broadcast_and_weights():
    three = tree_of(rec(0, [1], [2, 3]), rec(1, [4], [5]), rec(2, [6], [7, 8, 9], [-0.1, -0.2, -0.3]))
    one = tree_of(rec(0, [1], [2]))
    seqs = trees_to_sequences([three, one], [0.5, -0.5])
    assert [s.tree_index for s in seqs] == [0, 0, 0, 1]
    assert [s.advantage for s in seqs] == [0.5, 0.5, 0.5, -0.5]
    assert [s.weight for s in seqs] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert seqs[2].sampler_logprobs == [-0.1, -0.2, -0.3]
    for t in (0, 1):
        assert sum(s.weight for s in seqs if s.tree_index == t) == pytest.approx(1.0)


def test_empty_outputs_are_skipped_and_weights_stay_normalised():
    t = tree_of(rec(0, [1], [2]), rec(1, [3], []), rec(2, [4], [5]))
    seqs = trees_to_sequences([t], [1.0])
    assert [s.prompt_ids for s in seqs] == [[1], [4]]
    assert [s.weight for s in seqs] == [0.5, 0.5]


def test_logprob_length_mismatch_names_the_request():
    bad = tree_of(rec(0, [1], [2]), rec(1, [3], [4, 5], [-1.0]))
    with pytest.raises(ValueError, match="tree 0 .* request 1: 1 logprobs for 2 output tokens"):
        trees_to_sequences([bad], [1.0])
    with pytest.raises(ValueError, match="2 trees but 1 advantages"):
        trees_to_sequences([bad, bad], [1.0])


def test_prepare_sequences_drops_flat_groups_on_request():
    trees = [tree_of(rec(0, [1], [2])) for _ in range(4)]
    rewards = [1.0, 1.0, 0.0, 1.0]  # group 0 is flat
    kept = prepare_sequences(trees, rewards, GRPOConfig(group_size=2, drop_zero_adv_groups=True))
    assert [(s.tree_index, s.advantage) for s in kept] == [(2, -0.5), (3, 0.5)]
    assert len(prepare_sequences(trees, rewards, GRPOConfig(group_size=2))) == 4


@pytest.mark.parametrize("fault", [EndReason.ERROR, EndReason.TIMEOUT])
def test_a_faulted_tree_leaves_its_group_and_the_rest_keep_their_signal(fault):
    from dataclasses import replace

    healthy = [tree_of(rec(0, [1], [2])) for _ in range(5)]
    broken = tree_of(rec(0, [1], [2]), replace(rec(1, [3], [4]), end_reason=fault))
    trees = [healthy[0], broken, healthy[1], healthy[2], healthy[3], broken]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # groups of 3: the broken trees score 0 like wrong answers
    seqs = prepare_sequences(trees, rewards, GRPOConfig(group_size=3))
    assert 1 not in {s.tree_index for s in seqs} and 5 not in {s.tree_index for s in seqs}
    by_tree = {s.tree_index: s.advantage for s in seqs}
    # group 0: mean of the healthy 1.0 and 0.0, not of all three (which would make tree 0's +0.67)
    assert by_tree[0] == pytest.approx(0.5) and by_tree[2] == pytest.approx(-0.5)
    # group 1: the healthy 1.0 and 0.0 again
    assert by_tree[3] == pytest.approx(0.5) and by_tree[4] == pytest.approx(-0.5)


def test_a_group_with_fewer_than_two_healthy_trees_has_no_signal():
    from dataclasses import replace

    broken = tree_of(replace(rec(0, [1], [2]), end_reason=EndReason.ERROR))
    ok = tree_of(rec(0, [1], [2]))
    valid = [True, False, False]
    assert group_advantages([1.0, 0.0, 0.0], 3, valid=valid) == [0.0, 0.0, 0.0]
    assert flat_groups([1.0, 0.0, 0.0], 3, valid=valid) == [True] * 3
    assert prepare_sequences([ok, broken, broken], [1.0, 0.0, 0.0], GRPOConfig(group_size=3)) == [
        s for s in prepare_sequences([ok], [1.0], GRPOConfig(group_size=1))]  # advantage 0, no other tree
    assert group_advantages([1.0, 0.0, 0.5, 0.5], 2, normalize_std=True, valid=[True, True, True, False]) == [
        pytest.approx(1.0, abs=1e-5), pytest.approx(-1.0, abs=1e-5), 0.0, 0.0]


def test_duplicating_threads_keeps_the_tree_weight():
    base = tree_of(rec(0, [1, 2], [3, 4]), rec(1, [5], [6]))
    dup = tree_of(*(base.threads * 2))
    cfg = GRPOConfig(kl_coef=0.0)
    losses = []
    for t in (base, dup):
        seqs = trees_to_sequences([t], [0.7])
        assert sum(s.weight for s in seqs) == pytest.approx(1.0)
        (mb,) = make_micro_batches(seqs, 10_000, pad_id=0)
        new = mb.old_logprobs + 0.1 * mb.loss_mask  # ratio e^0.1, inside the clip range
        losses.append(policy_loss(new, mb, cfg)[0])
    assert losses[0].item() == pytest.approx(-0.7 * math.exp(0.1))
    assert losses[1].item() == pytest.approx(losses[0].item())


# ---------------------------------------------------------------- micro-batches, masks, shift


def test_masks_and_placement():
    seqs = [
        TrainSequence([3, 4], [5, 6, 7], advantage=0.5, weight=0.5, sampler_logprobs=[-1, -2, -3],
                      tree_index=0),
        TrainSequence([8, 9, 10, 11], [12], advantage=0.5, weight=0.5, sampler_logprobs=[-4], tree_index=0),
        TrainSequence([1], [2], advantage=-1.0, weight=1.0, sampler_logprobs=[-5], tree_index=1),
    ]
    (mb,) = make_micro_batches(seqs, 10_000, pad_id=0)
    assert mb.seq_index.tolist() == [0, 1, 2]
    assert mb.input_ids.tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12], [1, 2, 0, 0, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # prompt (join blocks included) and padding: 0; output: 1
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0]]
    assert mb.old_logprobs.tolist() == [[0, 0, -1, -2, -3], [0, 0, 0, 0, -4], [0, -5, 0, 0, 0]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, 0, 0, 0, 0.5], [0, -1, 0, 0, 0]]
    assert mb.weights.tolist() == [[0, 0, 0.5, 0.5, 0.5], [0, 0, 0, 0, 0.5], [0, 1, 0, 0, 0]]
    assert mb.num_trees == 2
    assert mb.total_token_weight == pytest.approx(0.5 * 3 + 0.5 * 1 + 1.0)


class LookupLM(torch.nn.Module):
    """Logits at position t depend only on token t: a bigram table, so the shift can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_token_logprobs_shift():
    torch.manual_seed(0)
    lm = LookupLM()
    seqs = [TrainSequence([3, 4], [5, 6, 7]), TrainSequence([9], [10])]
    (mb,) = make_micro_batches(seqs, 10_000, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(lm, mb)
        table = torch.log_softmax(lm.table.weight, dim=-1)
    assert lp.shape == (2, 5) and lp.dtype == torch.float32
    for b, ids in enumerate([[3, 4, 5, 6, 7], [9, 10]]):
        assert lp[b, 0] == 0.0
        for t in range(1, len(ids)):  # token t is scored by the logits at t - 1
            assert lp[b, t].item() == pytest.approx(table[ids[t - 1], ids[t]].item(), abs=1e-6)


def test_packing_by_length_and_padding_fraction():
    seqs = [TrainSequence([1] * (n - 1), [2]) for n in (3, 10, 2, 9)]
    mbs = make_micro_batches(seqs, 20, pad_id=0)
    # longest first: [10, 9] fills 2 x 10 = 20; then [3, 2] uses 2 x 3
    assert [mb.seq_index.tolist() for mb in mbs] == [[1, 3], [0, 2]]
    assert [tuple(mb.input_ids.shape) for mb in mbs] == [(2, 10), (2, 3)]
    assert padding_fraction(mbs) == pytest.approx(2 / 26)
    assert padding_fraction(make_micro_batches(seqs, 1000, pad_id=0)) == pytest.approx(16 / 40)


def test_oversized_sequence_gets_its_own_micro_batch():
    seqs = [TrainSequence([1] * 29, [2]), TrainSequence([1], [2])]
    assert [mb.input_ids.shape[1] for mb in make_micro_batches(seqs, 8, pad_id=0)] == [30, 2]


def test_bad_sequences_are_named():
    with pytest.raises(ValueError, match="sequence 1 has no sampler_logprobs"):
        make_micro_batches([TrainSequence([1], [2], sampler_logprobs=[-1.0]), TrainSequence([1], [2])], 99, 0)
    with pytest.raises(ValueError, match="sequence 0 .*0 prompt and 1 output"):
        make_micro_batches([TrainSequence([], [2])], 99, 0)
    with pytest.raises(ValueError, match=r"sequence 0 \(tree 3\): 2 sampler logprobs for 1 output"):
        make_micro_batches([TrainSequence([1], [2], sampler_logprobs=[-1.0, -1.0], tree_index=3)], 99, 0)


# ---------------------------------------------------------------- the clipped loss and KL


def one_sequence_batch(advantage: float):
    seq = TrainSequence([1, 2], [3, 4, 5], advantage=advantage, sampler_logprobs=[-1.0] * 3, tree_index=0)
    (mb,) = make_micro_batches([seq], 99, pad_id=0)
    return mb


@pytest.mark.parametrize(
    "advantage, loss, grads, clip_frac",
    [
        # ratios 0.5, 1.1, 1.5, eps 0.2. A=+1: -min(r, clip(r)) = -0.5, -1.1, -1.2 (1.5 clipped, no grad)
        (1.0, -(0.5 + 1.1 + 1.2) / 3, [-0.5 / 3, -1.1 / 3, 0.0], 1 / 3),
        # A=-1: -min(-r, -clip(r)) = 0.8 (0.5 clipped, no grad), 1.1, 1.5
        (-1.0, (0.8 + 1.1 + 1.5) / 3, [0.0, 1.1 / 3, 1.5 / 3], 1 / 3),
    ],
)
def test_clipped_loss_by_hand(advantage, loss, grads, clip_frac):
    mb = one_sequence_batch(advantage)
    new = mb.old_logprobs + with_token_values(mb, [math.log(0.5), math.log(1.1), math.log(1.5)])
    new.requires_grad_(True)
    out, metrics = policy_loss(new, mb, GRPOConfig(kl_coef=0.0))
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    # d loss / d logprob = -A * r / 3 on unclipped tokens (d r / d logprob = r), 0 on clipped ones and prompts
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, *grads], abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(clip_frac)
    assert metrics["ratio_mean"] == pytest.approx((0.5 + 1.1 + 1.5) / 3, abs=1e-6)
    assert metrics["tokens"] == 3


def test_clip_high_is_separate():
    mb = one_sequence_batch(1.0)
    new = mb.old_logprobs + with_token_values(mb, [math.log(1.25)] * 3)
    assert policy_loss(new, mb, GRPOConfig(kl_coef=0.0))[0].item() == pytest.approx(-1.2)
    assert policy_loss(new, mb, GRPOConfig(kl_coef=0.0, clip_eps_high=0.28))[0].item() == pytest.approx(-1.25)


def test_constant_norm_pushes_every_token_of_a_wrong_tree_equally():
    short = TrainSequence([1], [3, 4], advantage=-1.0, sampler_logprobs=[-1.0] * 2, tree_index=0)
    long = TrainSequence([1], [3] * 8, advantage=-1.0, sampler_logprobs=[-1.0] * 8, tree_index=1)
    grads = {}
    for norm in ("tree_mean", "constant"):
        (mb,) = make_micro_batches([short, long], 99, pad_id=0)
        new = mb.old_logprobs.clone().requires_grad_(True)
        loss, _ = policy_loss(new, mb, GRPOConfig(kl_coef=0.0, loss_norm=norm, loss_norm_tokens=10))
        loss.backward()
        row_of = {int(i): b for b, i in enumerate(mb.seq_index)}
        grads[norm] = (new.grad[row_of[0]].abs().max().item(), new.grad[row_of[1]].abs().max().item())
        if norm == "constant":  # -A * r summed over 10 tokens / 10 / 2 trees
            assert loss.item() == pytest.approx(10 / 10 / 2)
    # tree_mean: a token of the long wrong sequence is pushed down 4x less than one of the short
    assert grads["tree_mean"][0] == pytest.approx(4 * grads["tree_mean"][1])
    assert grads["constant"][0] == pytest.approx(grads["constant"][1]) == pytest.approx(1 / 10 / 2)


def test_k3_kl_by_hand():
    mb = one_sequence_batch(0.0)  # no policy term: only the KL remains
    new = mb.old_logprobs.clone()
    ref = new + math.log(2.0)
    ref[0, :2] = 50.0  # prompt positions: must be masked out, not overflow
    out, metrics = policy_loss(new, mb, GRPOConfig(kl_coef=0.1), ref_logprobs=ref)
    k3 = 2.0 - math.log(2.0) - 1.0  # exp(d) - d - 1 with d = ln 2
    assert metrics["kl_ref"] == pytest.approx(k3, abs=1e-6)
    assert out.item() == pytest.approx(0.1 * k3, abs=1e-6)
    assert metrics["approx_kl_sampler"] == 0.0


def test_loss_refuses_missing_inputs():
    with pytest.raises(ValueError, match="kl_coef=0.001 needs ref_logprobs"):
        policy_loss(torch.zeros(1, 5), one_sequence_batch(1.0), GRPOConfig())
    (sft_mb,) = make_micro_batches([TrainSequence([1], [2])], 99, pad_id=0)
    with pytest.raises(ValueError, match="needs sampler logprobs"):
        policy_loss(torch.zeros(1, 2), sft_mb, GRPOConfig(kl_coef=0.0))


def test_sft_loss_is_a_batch_token_mean():
    seqs = [TrainSequence([1], [2, 3, 4]), TrainSequence([1, 1, 1], [5])]
    (mb,) = make_micro_batches(seqs, 99, pad_id=0)
    new = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, 0.0, 0.0, -4.0]])
    loss, metrics = sft_loss(new, mb)
    assert loss.item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert metrics["tokens"] == 4
    split = make_micro_batches(seqs, 4, pad_id=0)  # one row each
    assert len(split) == 2
    total = sum(sft_loss(new[mb.seq_index], mb)[0] for mb in split)
    assert total.item() == pytest.approx(loss.item())


def test_config_defaults_and_typos():
    cfg = GRPOConfig()
    assert (cfg.group_size, cfg.clip_high, cfg.kl_coef, cfg.inner_steps) == (5, 0.2, 0.001, 2)
    with pytest.raises(ValidationError, match="kl_coeff"):
        GRPOConfig(kl_coeff=0.0)
    with pytest.raises(ValidationError, match="clip_eps"):
        GRPOConfig(clip_eps=1.5)


# ---------------------------------------------------------------- with a real (tiny) model


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout, deterministic


def random_record(rng: random.Random, i: int) -> ThreadRecord:
    prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 6))]
    output = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 8))]
    return rec(i, prompt, output)


def with_sampler_logprobs(model, seqs, noise: float, rng: random.Random) -> list[TrainSequence]:
    """Sampler logprobs = the model's own (plus optional noise, so that some ratios get clipped)."""
    (mb,) = make_micro_batches(seqs, 10_000, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model, mb)
    for row, i in enumerate(mb.seq_index.tolist()):
        s = seqs[i]
        p = len(s.prompt_ids)
        own = lp[row, p : p + len(s.output_ids)].tolist()
        s.sampler_logprobs = [v + rng.uniform(-noise, noise) for v in own]
    return seqs


def test_micro_batches_sum_to_the_full_batch_loss_and_gradient():
    rng = random.Random(0)
    model, ref_model = tiny_llama(0), tiny_llama(1)
    trees = [tree_of(*(random_record(rng, i) for i in range(k))) for k in (3, 1, 2, 2)]
    seqs = trees_to_sequences(trees, group_advantages([1.0, 0.0, 0.2, 1.0], 2))
    seqs = with_sampler_logprobs(model, seqs, noise=0.3, rng=rng)
    cfg = GRPOConfig(group_size=2, kl_coef=0.05)

    def loss_and_grads(max_tokens: int):
        model.zero_grad()
        mbs = make_micro_batches(seqs, max_tokens, pad_id=0)
        total, clip = 0.0, 0.0
        for mb in mbs:
            with torch.no_grad():
                ref = token_logprobs(ref_model, mb)
            loss, metrics = policy_loss(token_logprobs(model, mb), mb, cfg, ref_logprobs=ref)
            loss.backward()
            total, clip = total + loss.item(), clip + metrics["clip_frac"] * metrics["tokens"]
        return len(mbs), total, clip, [p.grad.clone() for p in model.parameters()]

    n_one, loss_one, clip_one, grads_one = loss_and_grads(10_000)
    n_many, loss_many, clip_many, grads_many = loss_and_grads(24)
    assert (n_one, n_many > 2) == (1, True)
    assert clip_one > 0  # the noise makes some ratios leave the clip range
    assert loss_many == pytest.approx(loss_one, abs=1e-6)
    assert clip_many == pytest.approx(clip_one)
    for g1, g2 in zip(grads_one, grads_many):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_one_step_raises_the_rewarded_tree_and_lowers_the_other():
    rng = random.Random(1)
    model = tiny_llama(0)
    rewarded = tree_of(random_record(rng, 0), random_record(rng, 1))
    punished = tree_of(random_record(rng, 0))
    seqs = trees_to_sequences([rewarded, punished], group_advantages([1.0, 0.0], group_size=2))
    seqs = with_sampler_logprobs(model, seqs, noise=0.0, rng=rng)
    (mb,) = make_micro_batches(seqs, 10_000, pad_id=0)

    def mean_logprob_per_tree() -> list[float]:
        with torch.no_grad():
            lp = token_logprobs(model, mb)
        return [
            float((lp * mb.loss_mask)[mb.tree_index == t].sum() / mb.loss_mask[mb.tree_index == t].sum())
            for t in (0, 1)
        ]

    before = mean_logprob_per_tree()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, metrics = policy_loss(token_logprobs(model, mb), mb, GRPOConfig(group_size=2, kl_coef=0.0))
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy: sampler == model
    loss.backward()
    optimizer.step()
    after = mean_logprob_per_tree()
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


def test_rollout_metrics_report_the_critical_path_of_correct_trees_only():
    from apr_ray.trainer import rollout_metrics
    from apr_ray.types import TreeMetrics, TreeRecord

    def tree(correct: bool, total: int, cp: int) -> TreeRecord:
        return TreeRecord(1, [1], [], TreeMetrics(total, cp, 1, 1, 0, cp, 0.0), "x" if correct else None, correct)

    m = rollout_metrics([tree(True, 300, 100), tree(False, 900, 900), tree(True, 500, 300)], [1.0, 0.0, 1.0], 0)
    assert m["correct_critical_path_mean"] == 200 and m["correct_tokens_total_mean"] == 400
    assert m["tokens_critical_path_mean"] == (100 + 900 + 300) / 3
    # eta = 1 - cp / total of the correct trees: 2/3 and 2/5
    assert m["correct_eta_p25"] == pytest.approx(0.4) and m["correct_eta_p75"] == pytest.approx(2 / 3)
    assert "correct_critical_path_mean" not in rollout_metrics([tree(False, 10, 10)], [0.0], 0)
    assert "correct_eta_p50" not in rollout_metrics([tree(False, 10, 10)], [0.0], 0)
