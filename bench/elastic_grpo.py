"""A whole GRPO stage (`apr-ray grpo`'s pipeline: data, learner actor, generator pool, weight sync) on a
`ray.cluster_utils.Cluster` whose rollout nodes come and go while it trains, with
`rollout.pool.follow_cluster` on: per step, the pool size, actors joined and lost, requests served again,
the version lag of the trees (0: every actor, new ones included, sampled with the current weights) and
the step time, read back from the run's metrics.jsonl.

Schedule: the run starts with 1 rollout node (resource `rollout: 1`); when step 2 is logged two nodes join
(the pool grows at the next step boundary); when step 5 is logged, one of them is removed 1 s later, while
step 6 rolls out (its actor dies mid-step, its requests go to the others). 8 steps of 8 problems x 4 trees,
160-token threads, the tiny model untrained (the mechanics, not learning), transformers engine.

    .venv/bin/python bench/elastic_grpo.py     # ~4 min on 2 cores; prints a markdown table, then the
                                               # BENCH_SUMMARY line of bench/all.py

The nodes share this machine's 2 cores, so more actors do not make a step faster here.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

OVERRIDES = [
    "data.train_problems=200", "data.val_problems=8", "data.test_problems=4",
    "grpo.steps=8", "grpo.problems_per_step=8", "grpo.algorithm.group_size=4", "grpo.eval_every=0",
    "eval.problems=4", "eval.sampled_problems=0", "eval.sample_trees=0",
    "rollout.backend=transformers", "rollout.runtime.max_tokens=160", "rollout.runtime.context_window=512",
    "rollout.pool.num_workers=1", "rollout.pool.min_workers=1", "rollout.pool.max_workers=4",
    "rollout.pool.cpus_per_worker=0.5", "rollout.pool.groups_per_request=1", "rollout.pool.requests_per_worker=2",
    "rollout.pool.follow_cluster=true", "rollout.pool.worker_resource=rollout",
    "learners.cpus_per_learner=1", "tracking.enabled=false",
]


def logged_steps(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
    return [r for r in rows if "grpo/step_s" in r]


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from apr_ray.config import load_config
    from apr_ray.pipeline import Pipeline

    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(None, OVERRIDES + [f"output_dir={out}"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.init(address=cluster.address)
    nodes = [cluster.add_node(num_cpus=1, resources={"rollout": 1})]
    cluster.wait_for_nodes()
    events: list[str] = []
    outcome: dict = {}

    def train() -> None:  # the run, off the main thread: starting Ray nodes needs the main thread
        try:
            outcome["report"] = Pipeline(cfg, progress=False).run(("data", "grpo"))
        except BaseException as err:  # noqa: BLE001  (re-raised below, in the main thread)
            outcome["error"] = err

    start = time.perf_counter()
    runner = threading.Thread(target=train)
    runner.start()
    try:
        joined = removed = False
        while runner.is_alive():  # the cluster's side: nodes join and leave as the run logs its steps
            steps = len(logged_steps(out / "metrics.jsonl"))
            if steps >= 2 and not joined:
                nodes.extend(cluster.add_node(num_cpus=1, resources={"rollout": 1}) for _ in range(2))
                events.append(f"2 nodes added after step {steps} was logged")
                joined = True
            if steps >= 5 and joined and not removed:
                time.sleep(1.0)
                cluster.remove_node(nodes[1])
                events.append(f"1 node removed 1 s after step {steps} was logged")
                removed = True
            time.sleep(0.2)
        runner.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    report, wall = outcome["report"], time.perf_counter() - start

    rows = logged_steps(out / "metrics.jsonl")
    print(f"## Elastic GRPO run ({date.today()}, `bench/elastic_grpo.py`)\n")
    print("Events: " + "; ".join(events) + f". Run wall {wall:.0f} s; steps with a non-empty update "
          f"{report.grpo_steps[0]} of {report.grpo_steps[1]}.\n")
    print("| step | pool size | joined before the step | left (before or during) | requests served again | trees per "
          "actor | version lag | rollout (s) | step (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        per_actor = ", ".join(f"{int(v)}" for k, v in sorted(r.items()) if k.startswith("grpo/generator")
                              and k.endswith("_trees"))
        print(f"| {r['step']} | {r['grpo/pool_size']:.0f} | {r['grpo/pool_joined']:.0f} | {r['grpo/pool_left']:.0f} | "
              f"{r['grpo/redispatched_requests']:.0f} | {per_actor} | {r['grpo/version_lag_mean']:.2f} | "
              f"{r['grpo/time_rollout_s']:.1f} | {r['grpo/step_s']:.1f} |")
    print("BENCH_SUMMARY " + json.dumps({
        "steps": len(rows), "pool_size_max": max(r["grpo/pool_size"] for r in rows),
        "requests_served_again": sum(r["grpo/redispatched_requests"] for r in rows),
        "version_lag_max": max(r["grpo/version_lag_mean"] for r in rows), "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
