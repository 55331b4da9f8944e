"""The generator actor on a real engine: a tiny Llama with random weights on vLLM (CPU build) inside a Ray
actor, 120+ thread trees at once from concurrent calls. Every tree ends with recorded reasons, nothing
escapes, token ids and logprobs are consistent; then a weight update through the object store while a
batch runs: the trees in flight finish on the old version, later ones report the new one, and reloading
the original weights gives back the original greedy tokens exactly."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

from apr_ray.countdown.problems import ProblemConfig, generate_problems  # noqa: E402
from apr_ray.modeling import ModelConfig, init_model, save_pretrained  # noqa: E402
from apr_ray.rollout.generator import Generator, problems_to_batch  # noqa: E402
from apr_ray.tokenizer import build_tokenizer  # noqa: E402
from apr_ray.types import EndReason  # noqa: E402
from apr_ray.weight_sync import ObjectStoreTransport  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]

MODEL = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
                    max_position_embeddings=1024, seed=1)
RUNTIME = {"max_tokens": 40, "context_window": 512, "timeout_s": 300.0, "max_children": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("tiny_llama")
    model = init_model(MODEL, tok)
    save_pretrained(model, tok, out)
    return out, {k: v.clone() for k, v in model.state_dict().items()}, tok


@pytest.fixture(scope="module")
def generator(model_dir):
    path, _, _ = model_dir
    started = not ray.is_initialized()  # another module of the session may hold a cluster: reuse it
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = {
        "engine": {"model": str(path), "max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024**2},
        "runtime": {**RUNTIME, "sampling": {"temperature": 1.0, "seed": 0}},
    }
    actor = Generator.options(num_cpus=2).remote(cfg)
    ray.get(actor.start.remote(), timeout=300)
    yield actor
    ray.get(actor.shutdown.remote())
    ray.kill(actor)
    if started:
        ray.shutdown()


def check_trees(trees, tok, version):
    vocab = len(tok)
    for tree in trees:
        assert tree.threads, tree.problem_id
        assert tree.policy_version == version
        assert not tree.correct and tree.check_reason  # random weights solve nothing
        for r in tree.threads:
            assert isinstance(r.end_reason, EndReason)
            assert r.end_reason not in (EndReason.ERROR, EndReason.TIMEOUT), r.detail
            assert len(r.logprobs) == len(r.output_ids) >= 1
            assert r.prompt_ids[0] == tok.bos_token_id
            assert all(0 <= i < vocab for i in r.output_ids) and all(lp <= 0.0 for lp in r.logprobs)
            assert all(np.isfinite(r.logprobs))
            assert tok.eos_token_id not in r.output_ids[:-1]
            assert (r.output_ids[-1] == tok.eos_token_id) == (r.end_reason in (EndReason.EOS, EndReason.SPAWN,
                                                                              EndReason.MALFORMED, EndReason.DEPTH))
            if r.end_reason is EndReason.MAX_TOKENS:
                assert len(r.output_ids) == RUNTIME["max_tokens"]
        m = tree.metrics
        assert m.tokens_total == sum(len(r.output_ids) for r in tree.threads) > 0


def test_many_trees_at_once_on_a_random_model(generator, model_dir):
    _, _, tok = model_dir
    problems = generate_problems(ProblemConfig(), 120, seed=3)
    # three calls in flight together: their trees share the engine
    refs = [generator.run_trees.remote(problems_to_batch(problems[i::3], seeds=range(i, 120, 3))) for i in range(3)]
    trees = [t for batch in ray.get(refs, timeout=600) for t in batch]
    assert len(trees) == 120
    assert sorted(t.problem_id for t in trees) == sorted(p.problem_id for p in problems)
    check_trees(trees, tok, version=0)
    stats = ray.get(generator.stats.remote())
    assert stats["trees_done"] == 120 and stats["trees_in_flight"] == 0


def test_weight_update_while_trees_run(generator, model_dir):
    _, weights, tok = model_dir
    problems = generate_problems(ProblemConfig(), 24, seed=4)
    transport = ObjectStoreTransport()
    running = generator.run_trees.remote(problems_to_batch(problems))
    scaled = transport.publish({k: v * 1.5 for k, v in weights.items()}, version=1)
    assert ray.get(generator.update_weights.remote(scaled), timeout=300) == 1
    during = ray.get(running, timeout=300)
    assert {t.policy_version for t in during} == {0}  # started before the update: finished on version 0
    assert ray.get(generator.stats.remote())["last_drained"] > 0  # the update waited for them
    assert ray.get(generator.policy_version.remote()) == 1
    after = ray.get(generator.run_trees.remote(problems_to_batch(problems[:8])))
    check_trees(after, tok, version=1)
    # a stale handle is ignored; the original weights as version 2 give back the version-0 tokens exactly
    assert ray.get(generator.update_weights.remote(scaled)) == 1
    assert ray.get(generator.update_weights.remote(transport.publish(weights, version=2))) == 2
    again = ray.get(generator.run_trees.remote(problems_to_batch(problems[:8])))
    v2 = [[r.output_ids for r in t.threads] for t in again]
    v0 = [[r.output_ids for r in t.threads] for t in during[:8]]
    assert v2 == v0  # seeded sampling: same seeds, same weights, same tokens
