"""The learner and the transformers engine on a CUDA device (bf16): the GPU path of the plain script.

Skipped without CUDA (tests/conftest.py). Needs torch, transformers, DeepSpeed and pydantic only (no Ray,
vLLM or MLflow), as on the lent GPU machines.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import Problem
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.learner.config import GRPOConfig, LearnerConfig
from apr_ray.learner.engine import Learner
from apr_ray.modeling import get_preset, init_model, save_pretrained
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.transformers_engine import TransformersEngine
from apr_ray.tokenizer import build_tokenizer
from apr_ray.types import TrainSequence

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("tiny")
    save_pretrained(init_model(get_preset("tiny"), tok), tok, out)
    return out


def _demo_sequences(n: int) -> list[TrainSequence]:
    import random

    tok = build_tokenizer()
    seqs = []
    for i in range(n):
        problem = Problem(10 + i % 20, (3 + i % 7, 5, 2 + i % 5))
        demo = flatten_apr(problem, solve_apr(problem, SolverConfig(), random.Random(i)))
        for s in demo.sequences:
            prompt = [tok.bos_token_id] + tok.encode(s.prompt, add_special_tokens=False)
            seqs.append(TrainSequence(prompt, tok.encode(s.completion, add_special_tokens=False) + [tok.eos_token_id]))
    return seqs


def test_bf16_sft_lowers_loss_on_cuda(model_dir):
    learner = Learner(LearnerConfig(lr=3e-3, warmup_steps=0, micro_batch_tokens=16384), model_dir)
    assert learner.bf16 and learner.device.type == "cuda"
    seqs = _demo_sequences(8)
    first = learner.sft_step(seqs)["loss"]
    for _ in range(30):
        last = learner.sft_step(seqs)["loss"]
    assert last < 0.5 * first, (first, last)


def test_grpo_step_runs_on_cuda(model_dir):
    learner = Learner(LearnerConfig(lr=1e-4, reference_model=True), model_dir)
    seqs = [TrainSequence(s.prompt_ids, s.output_ids, advantage=(1.0 if i % 2 else -1.0),
                          sampler_logprobs=[-1.0] * len(s.output_ids), tree_index=i)
            for i, s in enumerate(_demo_sequences(2))]
    out = learner.grpo_step(seqs, GRPOConfig(group_size=1, kl_coef=0.01, inner_steps=2))
    assert torch.isfinite(torch.tensor(out["loss"])) and out["tokens"] > 0


def test_transformers_engine_greedy_matches_generate_on_cuda(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda")
    tok = build_tokenizer()
    engine = TransformersEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompts = [[tok.bos_token_id] + tok.encode(f"Current State: {t}:[3, 5, 7], Operations: []\n",
                                               add_special_tokens=False) for t in (12, 15, 22)]

    async def run():
        return await asyncio.gather(*(engine.generate(p, 24, SamplingConfig(temperature=0.0)) for p in prompts))

    results = asyncio.run(run())
    for prompt, result in zip(prompts, results):
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
        assert result.output_ids == ref.tolist()[: len(result.output_ids)]
