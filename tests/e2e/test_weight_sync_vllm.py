"""Learner -> Ray object store -> running vLLM engine: after a sync vLLM serves exactly the learner's model.

CPU, float32, a tiny Llama with the project's tokenizer. One in-process vLLM engine for the module.
Exactness: vLLM's greedy continuation equals the learner model's, and the logprobs vLLM reports for
its tokens equal the learner model's logprobs of the same tokens to 1e-4. Before the sync they
differ, so the comparison can fail.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest
import torch

from apr_ray.learner.engine import Learner, LearnerConfig
from apr_ray.modeling import ModelConfig, init_model, save_pretrained
from apr_ray.rollout.engine_config import RELOAD_EXTENSION, VllmEngineConfig
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.generator import GeneratorConfig, GeneratorImpl
from apr_ray.rollout.vllm_engine import VllmEngine
from apr_ray.rollout.vllm_ext import reload_weights, weight_versions
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TrainSequence
from apr_ray.weight_sync import ObjectStoreTransport, WeightReceiver

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]

MODEL = ModelConfig(  # head_dim 32: a size vLLM's CPU attention serves
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
PROMPTS = [[1, 20, 21, 22], [1, 100, 101], [1, 57], [1, 300, 301, 302, 303]]
NEW_TOKENS = 16


def counting_batch(seed: int) -> list[TrainSequence]:
    """Runs of consecutive token ids: a pattern a tiny model picks up in a few steps."""
    starts = [10 + (37 * (seed + i)) % 400 for i in range(6)]
    return [TrainSequence([1, s, s + 1], list(range(s + 2, s + 20))) for s in starts]


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, recomputing the whole prefix each step (no cache to get wrong)."""
    ids = list(prompt)
    logprobs = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            tok = int(lp.argmax())
            ids.append(tok)
            logprobs.append(float(lp[tok]))
    return ids[len(prompt) :], logprobs


def vllm_greedy(llm) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0, detokenize=False, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    result = []
    for out in outs:
        o = out.outputs[0]
        result.append((list(o.token_ids), [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]))
    return result


def max_logprob_gap(llm_out, model: torch.nn.Module) -> float:
    """Largest |vLLM logprob - model logprob| over the tokens vLLM chose."""
    gap = 0.0
    for prompt, (tokens, lps) in zip(PROMPTS, llm_out):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        gap = max(gap, float((ref - torch.tensor(lps)).abs().max()))
    return gap


def assert_serves(llm, model: torch.nn.Module) -> None:
    llm_out = vllm_greedy(llm)
    for prompt, (tokens, lps) in zip(PROMPTS, llm_out):
        ref_tokens, ref_lps = greedy(model, prompt, NEW_TOKENS)
        assert tokens == ref_tokens, prompt
        assert lps == pytest.approx(ref_lps, abs=1e-4), prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("sync_model")
    save_pretrained(init_model(MODEL, tok), tok, out)
    return out


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def llm(model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: collective_rpc reaches it directly
    torch.set_num_threads(2)  # before vLLM's CPU worker replaces set_num_threads with a no-op
    from vllm import LLM

    engine = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=256 * 1024**2,
        max_model_len=256,
        seed=0,
        generation_config="vllm",
        # The generators' own extension (it adds the wire reload VllmEngine calls to WeightReloadExtension).
        worker_extension_cls=RELOAD_EXTENSION,
    )
    yield engine
    del engine


def test_sync_from_a_learner_makes_vllm_serve_its_model(llm, model_dir, ray_local):
    learner = Learner(LearnerConfig(lr=1e-2, torch_threads=2), model_dir)
    for step in range(8):
        learner.sft_step(counting_batch(step))
    model = learner.module.eval()
    assert max_logprob_gap(vllm_greedy(llm), model) > 1e-2  # vLLM still serves the initial weights

    transport = ObjectStoreTransport()
    receiver = WeightReceiver(transport, lambda named, v: reload_weights(llm, named, v), weight_versions(llm)[0])
    state = learner.full_state_dict()
    handle = transport.publish(state, version=receiver.version + 1)
    assert handle.num_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert receiver.apply(handle)
    assert weight_versions(llm) == [handle.version]
    assert_serves(llm, model)

    # versioned: the served version never goes back, and a partial set of weights is refused
    named = list(state.items())
    with pytest.raises(ValueError, match="not newer"):
        reload_weights(llm, named, handle.version)
    with pytest.raises(ValueError, match="names differ"):
        reload_weights(llm, named[:-1], handle.version + 1)
    assert weight_versions(llm) == [handle.version]


def test_sync_from_a_two_rank_zero3_group(llm, model_dir, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from apr_ray.learner.actor import LearnerGroup

    cfg = LearnerConfig(zero_stage=3, lr=1e-2, torch_threads=1, zero3_param_persistence_threshold=0)
    group = LearnerGroup(cfg, model_dir, num_learners=2)
    try:
        for step in range(6):
            group.sft_step(counting_batch(100 + step))
        version = weight_versions(llm)[0] + 1
        transport = ObjectStoreTransport()
        receiver = WeightReceiver(transport, lambda named, v: reload_weights(llm, named, v), version - 1)
        assert receiver.apply(group.publish_weights(transport, version))
        exported = AutoModelForCausalLM.from_pretrained(group.export_hf(tmp_path / "export"), dtype=torch.float32)
    finally:
        group.shutdown()
    assert weight_versions(llm) == [version]
    assert_serves(llm, exported.eval())


class _AsyncFace:
    """The three calls `VllmEngine` makes on its `AsyncLLM`, answered by the module's in-process `vllm.LLM`."""

    def __init__(self, llm):
        self._llm = llm

    async def generate(self, prompt, params, request_id):
        yield self._llm.generate([prompt], params, use_tqdm=False)[0]

    async def collective_rpc(self, method, args=()):
        return self._llm.collective_rpc(method, args=args)

    async def reset_prefix_cache(self):
        return self._llm.reset_prefix_cache()


class InProcessVllmEngine(VllmEngine):
    """The generators' `VllmEngine`, its own generate and reload_weights code, driving the module's engine:
    the sync path is the generators' without paying a second engine start (~40 s in a Ray actor)."""

    def __init__(self, llm, eos_token_id: int):  # VllmEngine.__init__ would start an AsyncLLM
        self.llm = _AsyncFace(llm)
        self.eos_token_id = eos_token_id
        self._ids = itertools.count()
        self._prefix = "sync-test-"
        self.max_model_len = llm.llm_engine.model_config.max_model_len


def test_trainer_sync_moves_the_generator_to_the_learners_new_weights(llm, model_dir, ray_local, tmp_path):
    """GRPOTrainer's sync (LearnerGroup.publish_weights -> ObjectStoreTransport -> GeneratorPool.sync_weights ->
    GeneratorImpl.update_weights -> VllmEngine.reload_weights -> WireReloadExtension), minus the Ray hop to
    the generator actor. The generator's greedy tokens must change with the learner's weights and equal
    the learner's own greedy decoding: a reload that did nothing, or reloaded the old weights, fails."""
    from transformers import AutoModelForCausalLM

    from apr_ray.learner.actor import LearnerGroup

    tok = build_tokenizer()
    base = weight_versions(llm)[0] + 1  # earlier tests of the module may have loaded versions already
    gen = GeneratorImpl(GeneratorConfig(engine=VllmEngineConfig(model=str(model_dir)), initial_version=base),
                        engine=InProcessVllmEngine(llm, tok.eos_token_id), tokenizer=tok)
    transport = ObjectStoreTransport()
    group = LearnerGroup(LearnerConfig(lr=1e-2, torch_threads=1), model_dir, num_learners=1)

    async def generator_greedy() -> list[tuple[list[int], list[float]]]:
        outs = [await gen.engine.generate(p, NEW_TOKENS, SamplingConfig(temperature=0.0), ignore_eos=True)
                for p in PROMPTS]
        return [(o.output_ids, o.logprobs) for o in outs]

    async def sync(version: int) -> None:  # GRPOTrainer._step, phase 5, with pool.sync_weights' actor call
        handle = group.publish_weights(transport, version)
        assert await gen.update_weights(handle) == version

    def assert_matches(served, model) -> None:
        for prompt, (tokens, lps) in zip(PROMPTS, served):
            ref_tokens, ref_lps = greedy(model, prompt, NEW_TOKENS)
            assert tokens == ref_tokens, prompt
            assert lps == pytest.approx(ref_lps, abs=1e-4), prompt

    async def scenario():
        # Before: the learner's starting weights, loaded through the same path, so the state compared
        # against is known whatever earlier tests left in the engine.
        await sync(base + 1)
        before = await generator_greedy()
        before_state = {k: v.clone() for k, v in group.full_state_dict().items()}
        assert_matches(before, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())

        for step in range(10):  # a high lr on counting runs: the greedy continuations become counting
            group.sft_step(counting_batch(200 + step))
        after_state = group.full_state_dict()
        moved = max(float((after_state[k] - v).abs().max()) for k, v in before_state.items())
        assert moved > 0.05, f"the learner's weights barely moved ({moved:.4f}): the test would prove nothing"
        await sync(base + 2)
        return before, await generator_greedy()

    try:
        before, after = asyncio.run(scenario())
        learner_model = AutoModelForCausalLM.from_pretrained(group.export_hf(tmp_path / "after"), dtype=torch.float32)
    finally:
        group.shutdown()
    assert gen.policy_version() == base + 2 and weight_versions(llm) == [base + 2]
    changed = [p for p, b, a in zip(PROMPTS, before, after) if b[0] != a[0]]
    assert changed, "greedy tokens identical before and after the sync: the reload did not reach the sampler"
    assert_matches(after, learner_model.eval())
