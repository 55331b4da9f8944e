"""SFT from the demos dataset as it lies on disk: solver demonstrations → Parquet → streaming reader →
learner steps. The loss must fall well below half its start on a small set a tiny model can memorise."""

from __future__ import annotations

import random

import pyarrow.parquet as pq

from apr_ray.countdown.demos import flatten_apr
from apr_ray.countdown.problems import ProblemConfig, generate_problems
from apr_ray.countdown.solvers import SolverConfig, solve_apr
from apr_ray.data import DemoFormat, TextEncoder, demos_table, iter_sft_batches
from apr_ray.learner.engine import Learner, LearnerConfig
from apr_ray.modeling import ModelConfig, init_model, save_pretrained
from apr_ray.tokenizer import build_tokenizer

MODEL = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
                    max_position_embeddings=1024, tie_word_embeddings=True)


def test_sft_on_streamed_demonstrations_learns_them(tmp_path):
    tok = build_tokenizer()
    problems = generate_problems(ProblemConfig(num_operands=3, num_max=20, target_max=20), 3, seed=1)
    rng = random.Random(0)
    demos = [(f"d{i}", flatten_apr(p, solve_apr(p, SolverConfig(apr_max_beam=3, apr_max_sub_beam=3), rng)))
             for i, p in enumerate(problems)]
    (tmp_path / "demos").mkdir()
    pq.write_table(demos_table(demos, TextEncoder.from_tokenizer(tok), DemoFormat()), tmp_path / "demos" / "part.parquet")
    save_pretrained(init_model(MODEL, tok), tok, tmp_path / "model")
    learner = Learner(LearnerConfig(lr=1e-2, torch_threads=2, micro_batch_tokens=8192), tmp_path / "model")

    losses = []
    for epoch in range(40):
        for batch in iter_sft_batches(tmp_path / "demos", 64, shuffle_buffer=0, seed=epoch):
            assert all(seq.output_ids[-1] == tok.eos_token_id for seq in batch)
            losses.append(learner.sft_step(batch)["loss"])
    assert losses[-1] < 0.4 * losses[0], losses
