"""The generator pool following a cluster whose rollout nodes come and go, step by step: pool size, actors
joined and lost, requests served again and the rollout's wall time, on a `ray.cluster_utils.Cluster`
(several Ray nodes on this machine). The same rollout (16 problems x 4 samples, 160-token threads, the tiny model untrained,
transformers engine) every step; between steps the pool follows the cluster (`GeneratorPool.follow_cluster`),
as the GRPO trainer does with `rollout.pool.follow_cluster`.

Schedule: 1 rollout node; a second joins before step 3 and a third before step 5; the second is removed
while step 7 runs (its actor dies mid-rollout, its requests go to the others); the run ends at step 9.

    .venv/bin/python bench/elastic_pool.py     # ~2 min on 2 cores; prints a markdown table, then the
                                               # BENCH_SUMMARY line of bench/all.py

The nodes share this machine's 2 cores, so more actors do not mean faster steps here: the figures show that
the pool follows the nodes and the steps complete, not a speed-up.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from datetime import date


def main() -> None:
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

    tok = build_tokenizer()
    model_dir = save_pretrained(init_model(get_preset("tiny"), tok), tok, tempfile.mkdtemp())
    gen_cfg = GeneratorConfig(engine=VllmEngineConfig(model=str(model_dir)), backend="transformers",
                              runtime=RuntimeConfig(max_tokens=160, context_window=512), max_concurrent_trees=32)
    cfg = PoolConfig(num_workers=1, min_workers=1, max_workers=4, cpus_per_worker=0.5, groups_per_request=1,
                     requests_per_worker=2, follow_cluster=True, worker_resource="rollout")
    problems = [Problem(10 + i, (i + 1, i + 2, 3)) for i in range(16)]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.init(address=cluster.address)
    rows = []
    try:
        nodes = [cluster.add_node(num_cpus=1, resources={"rollout": 1})]
        cluster.wait_for_nodes()
        pool = GeneratorPool(gen_cfg, cfg)
        for step in range(1, 10):
            if step in (3, 5):
                nodes.append(cluster.add_node(num_cpus=1, resources={"rollout": 1}))
                cluster.wait_for_nodes()
            membership = pool.follow_cluster()
            remover = None
            if step == 7:  # the second node leaves while the step's rollout runs
                remover = threading.Timer(0.3, cluster.remove_node, args=(nodes[1],))
                remover.start()
            start = time.perf_counter()
            trees, stats = pool.rollout(problems, 4, seed=step * 1000)
            wall = time.perf_counter() - start
            if remover is not None:
                remover.join()
            assert [t.problem_id for t in trees] == [p.problem_id for p in problems for _ in range(4)]
            rows.append((step, membership["pool_joined"], membership["pool_left"], stats.lost, stats.replaced,
                         stats.redispatched, pool.size, len(stats.per_actor_trees), wall))
        pool.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"## Elastic generator pool ({date.today()}, `bench/elastic_pool.py`)\n")
    print("| step | joined before the step | left before the step | lost during the step | replaced | requests "
          "served again | pool size after | actors that served | rollout wall (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for step, joined, left, lost, replaced, redispatched, size, served, wall in rows:
        print(f"| {step} | {joined:.0f} | {left:.0f} | {lost} | {replaced} | {redispatched} | {size} | {served} | "
              f"{wall:.1f} |")
    _, _, _, lost, _, redispatched, size, _, _ = zip(*rows)
    print("BENCH_SUMMARY " + json.dumps({"steps": len(rows), "pool_size_max": max(size), "actors_lost": sum(lost),
                                         "requests_served_again": sum(redispatched)}), flush=True)


if __name__ == "__main__":
    main()
