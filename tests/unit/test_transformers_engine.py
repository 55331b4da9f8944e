"""The transformers engine: concurrent requests prefilled together and decoded with a KV cache; greedy
output equal to `model.generate` on each prompt alone, also when rows end at different steps (EOS,
max_new_tokens), leave the batch and others join it (continuous batching); sampler logprobs equal to a
full forward pass; seeded sampling reproducible and independent of batching, top-k / top-p edge cases; EOS,
max_new_tokens and ignore_eos; cancelling one request leaves the others alone, and an event loop closing
early leaves the engine usable; whole thread trees on a tiny random model."""

import asyncio

import pytest
import torch

from apr_ray.countdown.protocol import AprProtocol
from apr_ray.modeling import ModelConfig, init_model
from apr_ray.rollout.engines import SamplingConfig, TextCodec
from apr_ray.rollout.runtime import Runtime, RuntimeConfig
from apr_ray.rollout.transformers_engine import TransformersEngine, _sample
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import EndReason

torch.set_num_threads(2)
GREEDY = SamplingConfig(temperature=0.0)
SMALL = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
                    max_position_embeddings=256, seed=3)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return init_model(SMALL, tok)


def prompts(tok):
    codec = TextCodec(tok)
    texts = ["Moving to Node #0\n", "Current State: 27:[22, 26, 31, 53], Operations: []\n",
             "Moving to Node #0,1\nCurrent State: 27:[22, 26, 22], Operations: ['53-31=22']\nExploring Operation: "]
    return [[tok.bos_token_id, *codec.encode(t)] for t in texts]


def generate_all(engine, requests):
    async def go():
        return await asyncio.gather(*(engine.generate(*r) for r in requests))

    return asyncio.run(go())


def reference(model, tok, prompt, max_new_tokens, eos_token_id):
    """`model.generate` on the prompt alone, greedy: the output ids."""
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=tok.pad_token_id,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return ref[0, len(prompt):].tolist()


def test_greedy_batch_equals_generate_on_each_prompt_alone(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    ps = prompts(tok)
    results = generate_all(engine, [(p, 20, GREEDY) for p in ps])
    assert engine.batch_sizes == [3]  # one prefill for the three concurrent requests
    for p, result in zip(ps, results):
        ref_ids = reference(model, tok, p, 20, tok.eos_token_id)
        assert result.output_ids == ref_ids
        assert result.finish_reason == ("eos" if ref_ids[-1] == tok.eos_token_id else "length")
        assert len(result.logprobs) == len(result.output_ids)


MORE_TEXTS = ["Goal Reached\n", "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"]


@pytest.fixture(scope="module")
def five_free(tok, model):
    """Five prompts and their 40-token greedy outputs from `model.generate` alone (the model never ends
    on its own within 40 tokens)."""
    codec = TextCodec(tok)
    ps = prompts(tok) + [[tok.bos_token_id, *codec.encode(t)] for t in MORE_TEXTS]
    free = [reference(model, tok, p, 40, tok.eos_token_id) for p in ps]
    assert all(len(f) == 40 for f in free)
    return ps, free


@pytest.mark.parametrize("max_batch_size", [64, 2])
def test_rows_ending_at_different_steps_equal_generate_alone(tok, model, five_free, max_batch_size):
    """Five rows with different max_new_tokens and an EOS id that the model emits at different steps in
    different rows: some end by EOS, some by length, each at its own step. With max_batch_size=2 rows
    leave and waiting requests join the running batch; outputs must not change."""
    ps, free = five_free
    # the EOS id: a token the free outputs hold at the most distinct first steps
    firsts = {t: {f.index(t) for f in free if t in f} for t in {t for f in free for t in f}}
    eos = min(firsts, key=lambda t: (-len(firsts[t]), t))
    limits = [40, 30, 6, 25, 20]
    engine = TransformersEngine(model, eos_token_id=eos, max_batch_size=max_batch_size)
    results = generate_all(engine, [(p, m, GREEDY) for p, m in zip(ps, limits)])
    for result, f, limit in zip(results, free, limits):
        # greedy decoding with this EOS id is the free output cut after its first EOS, then at the limit
        ref_ids = f[: f.index(eos) + 1] if eos in f else f
        ref_ids = ref_ids[:limit]
        assert result.output_ids == ref_ids
        assert result.finish_reason == ("eos" if ref_ids[-1] == eos else "length")
        assert len(result.logprobs) == len(result.output_ids)
    eos_steps = {len(r.output_ids) for r in results if r.finish_reason == "eos"}
    assert len(eos_steps) >= 2 and any(r.finish_reason == "length" for r in results)  # the case is really mixed
    if max_batch_size == 2:
        assert engine.batch_sizes[0] == 2 and sum(engine.batch_sizes) == 5 and len(engine.batch_sizes) >= 3


def test_a_request_arriving_while_a_batch_runs_joins_it(tok, model):
    """A request sent while another decodes joins the running batch at the next step and ends long before
    it (static batching would have it wait for the whole batch). Its prompt is longer than the running
    row's cache so far, and the running row outgrows its first cache buffer: both outputs stay exact."""
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    first_prompt, second_prompt = prompts(tok)[0], prompts(tok)[2]

    async def scenario():
        first = asyncio.create_task(engine.generate(first_prompt, 100, GREEDY))
        while engine.decode_steps < 5:
            await asyncio.sleep(0.001)
        second = await engine.generate(second_prompt, 12, GREEDY)
        return second, first.done(), await first

    second, first_done_then, first = asyncio.run(scenario())
    assert not first_done_then
    assert engine.batch_sizes == [1, 1]  # two prefills: the second request joined, it did not wait
    assert engine.decode_steps == 100 - 1  # one decode step per token after the first, shared by both rows
    assert first.output_ids == reference(model, tok, first_prompt, 100, tok.eos_token_id)
    assert second.output_ids == reference(model, tok, second_prompt, 12, tok.eos_token_id)
    assert len(first.output_ids) == 100 and len(second.output_ids) == 12


def test_a_seeded_request_samples_the_same_alone_or_batched(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id, max_batch_size=2)
    ps = prompts(tok)
    seeded = SamplingConfig(temperature=1.0, seed=9)
    (alone,) = generate_all(engine, [(ps[1], 30, seeded)])
    others = [(ps[0], 7, SamplingConfig(temperature=1.0, seed=1)), (ps[2], 3, GREEDY)]
    batched = generate_all(engine, [*others, (ps[1], 30, seeded)])[-1]  # joins when a row leaves
    assert batched.output_ids == alone.output_ids
    assert max(abs(a - b) for a, b in zip(batched.logprobs, alone.logprobs)) < 1e-4


def full_forward_logprobs(model, prompt, output):
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def test_sampled_logprobs_are_the_models_raw_logprobs(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    ps = prompts(tok)
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, seed=11)
    results = generate_all(engine, [(p, 16, sampling.model_copy(update={"seed": i})) for i, p in enumerate(ps)])
    for p, result in zip(ps, results):
        ref = full_forward_logprobs(model, p, result.output_ids)
        assert max(abs(a - b) for a, b in zip(result.logprobs, ref)) < 1e-4


def test_seeded_sampling_reproducible_and_degenerate_filters_are_greedy(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    p = prompts(tok)[1]
    seeded = SamplingConfig(temperature=1.5, seed=5)
    a, b, c = generate_all(engine, [(p, 24, seeded), (p, 24, seeded), (p, 24, seeded.model_copy(update={"seed": 6}))])
    assert a.output_ids == b.output_ids != c.output_ids
    greedy, top1, tiny_p = generate_all(engine, [
        (p, 24, GREEDY), (p, 24, SamplingConfig(temperature=1.0, top_k=1, seed=1)),
        (p, 24, SamplingConfig(temperature=1.0, top_p=1e-6, seed=2)),
    ])
    assert greedy.output_ids == top1.output_ids == tiny_p.output_ids


def test_unseeded_rows_drawn_together_follow_each_rows_filtered_distribution():
    """Unseeded rows with the same settings are drawn in one call: each row still samples from its own
    logits, top-k / top-p cut each row's own tail, and a greedy or seeded row beside them is untouched."""
    row_a = torch.log(torch.tensor([0.7, 0.2, 0.1, 1e-9, 1e-9, 1e-9]))
    row_b = torch.log(torch.tensor([1e-9, 1e-9, 1e-9, 0.1, 0.3, 0.6]))
    logits = torch.stack([row_a, row_b] * 2000)
    torch.manual_seed(0)
    plain = SamplingConfig(temperature=1.0)
    tokens = _sample(logits, [plain] * len(logits), [None] * len(logits))
    a, b = tokens[0::2], tokens[1::2]
    assert set(a.tolist()) <= {0, 1, 2} and set(b.tolist()) <= {3, 4, 5}
    assert abs((a == 0).float().mean().item() - 0.7) < 0.04 and abs((b == 5).float().mean().item() - 0.6) < 0.04
    top2 = _sample(logits, [SamplingConfig(temperature=1.0, top_k=2)] * len(logits), [None] * len(logits))
    assert set(top2[0::2].tolist()) == {0, 1} and set(top2[1::2].tolist()) == {4, 5}
    nucleus = _sample(logits, [SamplingConfig(temperature=1.0, top_p=0.65)] * len(logits), [None] * len(logits))
    assert set(nucleus[0::2].tolist()) == {0} and set(nucleus[1::2].tolist()) == {4, 5}
    mixed = _sample(logits[:3], [GREEDY, plain, SamplingConfig(temperature=1.0, seed=4)],
                    [None, None, torch.Generator().manual_seed(4)])
    again = _sample(logits[:3], [GREEDY, plain, SamplingConfig(temperature=1.0, seed=4)],
                    [None, None, torch.Generator().manual_seed(4)])
    assert mixed[0].item() == 0 and mixed[2].item() == again[2].item()


class EosAt(torch.nn.Module):
    """Wraps a model and makes EOS certain once a row holds `length` tokens (prompt included)."""

    def __init__(self, inner, eos, length):
        super().__init__()
        self.inner, self.eos, self.length = inner, eos, length
        self.config = inner.config

    def forward(self, attention_mask, **kw):
        out = self.inner(attention_mask=attention_mask, **kw)
        rows = attention_mask.sum(dim=1) >= self.length
        out.logits[rows, -1, self.eos] = 1e4
        return out


def test_eos_ends_a_request_unless_ignored(tok, model):
    p = prompts(tok)[0]
    engine = TransformersEngine(EosAt(model, tok.eos_token_id, len(p) + 5), eos_token_id=tok.eos_token_id)
    ended, short = generate_all(engine, [(p, 50, GREEDY), (p, 3, GREEDY)])
    assert ended.finish_reason == "eos" and len(ended.output_ids) == 6 and ended.output_ids[-1] == tok.eos_token_id
    assert ended.logprobs[-1] == pytest.approx(0.0, abs=1e-6)
    assert short.finish_reason == "length" and len(short.output_ids) == 3

    async def ignore():
        return await engine.generate(p, 12, GREEDY, ignore_eos=True)

    result = asyncio.run(ignore())
    assert result.finish_reason == "length" and len(result.output_ids) == 12
    assert result.output_ids[5] == tok.eos_token_id  # sampled, recorded, and decoding went on


def test_cancelling_one_request_leaves_the_others(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    p = prompts(tok)[0]

    async def scenario():
        long = asyncio.create_task(engine.generate(p, 120, SamplingConfig(temperature=1.0, seed=1), ignore_eos=True))
        other = asyncio.create_task(engine.generate(p, 120, GREEDY, ignore_eos=True))
        await asyncio.sleep(0.05)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return await other

    result = asyncio.run(scenario())
    assert len(result.output_ids) == 120 and engine.batch_sizes == [2]


def test_an_event_loop_closing_early_leaves_the_engine_usable(tok, model):
    """A loop that closes while the engine waits to start (its request and waiting task cancelled) must not
    leave it believing a decoding thread runs: the next loop's request is served."""
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id, max_wait_s=0.05)
    p = prompts(tok)[0]

    async def abandon():
        asyncio.get_running_loop().create_task(engine.generate(p, 5, GREEDY))
        await asyncio.sleep(0)  # the request is queued; the engine waits max_wait_s before starting

    asyncio.run(abandon())
    result = asyncio.run(asyncio.wait_for(engine.generate(p, 5, GREEDY), timeout=20))
    assert result.output_ids == reference(model, tok, p, 5, tok.eos_token_id)
    assert engine.batch_sizes == [1]  # the abandoned request was dropped, never decoded


def test_requests_beyond_the_models_positions_are_refused(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        asyncio.run(engine.generate([1] * 200, 100, GREEDY))


def test_thread_trees_on_a_random_model(tok, model):
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id, max_batch_size=8)
    runtime = Runtime(engine, tok, AprProtocol(), RuntimeConfig(max_tokens=24, context_window=256,
                                                               sampling=SamplingConfig(seed=0)))

    async def trees():
        return await asyncio.gather(*(runtime.run_tree(27, [22, 26, 31, 53], seed=i) for i in range(6)))

    for tree in asyncio.run(trees()):
        assert tree.threads and all(isinstance(r.end_reason, EndReason) for r in tree.threads)
        assert all(len(r.logprobs) == len(r.output_ids) and r.detail for r in tree.threads
                   if r.end_reason is not EndReason.EOS)
        assert not tree.correct and tree.check_reason
    assert max(engine.batch_sizes) > 1
