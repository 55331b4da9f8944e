"""The generator pool follows the cluster (`rollout.pool.follow_cluster`), on a multi-node cluster simulated
with `ray.cluster_utils.Cluster`: a node offering a `rollout` unit joins and gets an actor that serves the
current weights from the next step; a node that leaves takes its actor with it, the requests it held are
served by the others, the step completes with every problem once, and the pool shrinks instead of waiting
for room that is gone. Runs in its own process: it needs its own Ray cluster, not the suite's."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def scenario() -> dict:
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from apr_ray.config import PoolConfig
    from apr_ray.countdown.problems import Problem
    from apr_ray.modeling import get_preset, init_model, save_pretrained
    from apr_ray.pool import GeneratorPool
    from apr_ray.rollout.engine_config import VllmEngineConfig
    from apr_ray.rollout.generator import GeneratorConfig
    from apr_ray.rollout.runtime import RuntimeConfig
    from apr_ray.tokenizer import build_tokenizer
    from apr_ray.weight_sync import ObjectStoreTransport

    tok = build_tokenizer()
    model_dir = save_pretrained(init_model(get_preset("tiny"), tok), tok, tempfile.mkdtemp())
    gen_cfg = GeneratorConfig(engine=VllmEngineConfig(model=str(model_dir)), backend="transformers",
                              runtime=RuntimeConfig(max_tokens=16, context_window=256), max_concurrent_trees=32)
    cfg = PoolConfig(num_workers=1, min_workers=1, max_workers=3, cpus_per_worker=0.5, groups_per_request=1,
                     requests_per_worker=2, follow_cluster=True, worker_resource="rollout")
    problems = [Problem(10 + i, (i + 1, i + 2, 3)) for i in range(6)]
    ids = [p.problem_id for p in problems for _ in range(2)]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.init(address=cluster.address)
    out: dict = {}
    try:
        cluster.add_node(num_cpus=1, resources={"rollout": 1})
        cluster.wait_for_nodes()
        pool = GeneratorPool(gen_cfg, cfg)
        out["start"] = {"size": pool.size, "capacity": pool.capacity()}
        other = init_model(get_preset("tiny").model_copy(update={"seed": 1}), tok)
        pool.sync_weights(ObjectStoreTransport().publish(other.state_dict(), 3))

        joined = cluster.add_node(num_cpus=1, resources={"rollout": 1})
        cluster.wait_for_nodes()
        out["join"] = pool.follow_cluster()
        out["versions_after_join"] = [r.get() for r in pool.manager.foreach_actor("policy_version")]
        trees, stats = pool.rollout(problems, 2, seed=7)
        out["after_join"] = {"ids_ok": [t.problem_id for t in trees] == ids,
                             "actors_serving": sorted(stats.per_actor_trees)}

        cluster.remove_node(joined)
        deadline = time.monotonic() + 60
        while pool.capacity() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        trees, stats = pool.rollout(problems, 2, seed=7)
        out["after_leave"] = {"ids_ok": [t.problem_id for t in trees] == ids, "lost": stats.lost,
                              "replaced": stats.replaced, "size": pool.size, "redispatched": stats.redispatched,
                              "versions": sorted({t.policy_version for t in trees})}
        out["follow_after_leave"] = pool.follow_cluster()
        pool.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def test_the_pool_follows_nodes_that_join_and_leave():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["start"] == {"size": 1, "capacity": 1}
    assert out["join"] == {"pool_size": 2.0, "pool_joined": 1.0, "pool_left": 0.0}
    assert out["versions_after_join"] == [3, 3]  # the newcomer serves the current weights from its first tree
    assert out["after_join"] == {"ids_ok": True, "actors_serving": [0, 1]}
    leave = out["after_leave"]
    assert leave["ids_ok"] and leave["size"] == 1 and leave["replaced"] == 0 and leave["versions"] == [3]
    # the actor of the node that left was handed requests, found dead mid-step, and not replaced
    assert leave["lost"] == 1 and leave["redispatched"] >= 1
    assert out["follow_after_leave"]["pool_size"] == 1.0


if __name__ == "__main__":
    print(json.dumps(scenario()))
