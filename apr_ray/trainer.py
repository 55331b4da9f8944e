"""The GRPO driver: problems stream in from Ray Data, trees come back from the generator pool, rewards
and advantages turn them into training sequences, the learner updates, the weights go back to the pool.

One step, in numbered and timed phases (each phase's seconds are logged as `grpo/time_<phase>_s`):
  1. problems  the next `problems_per_step` train problems from the Ray Data stream (reshuffled per epoch)
  2. rollout   `group_size` trees per problem on the pool (fault tolerant: `pool.GeneratorPool`)
  3. score     rewards (`rewards.score_tree`), group advantages, sequences (`grpo.prepare_sequences`)
  4. train     `grpo.algorithm.inner_steps` optimizer steps on the learner group
  5. sync      the learner publishes the new weights, every generator loads them
  then, every `eval_every` steps, evaluation on the fixed validation problems, and every
  `checkpoint_every` steps, a DeepSpeed checkpoint.

Rollout and training do not overlap: the trees of step N are sampled with the weights of step N-1, so the
version lag is 0 (it is logged, measured from the trees). Overlap was not built: on the CPU machines
rollout and training share the same cores, so overlapping cannot make a step faster there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apr_ray.config import RunConfig
from apr_ray.countdown.problems import Problem
from apr_ray.evaluation import EvalResult, Evaluator
from apr_ray.grpo import faulted, flat_groups, prepare_sequences
from apr_ray.rewards import acceleration_ratio, score_tree
from apr_ray.sft import stop_on_interrupt
from apr_ray.types import TreeRecord

if TYPE_CHECKING:
    from apr_ray.pool import GeneratorPool

PHASES = ("problems", "rollout", "score", "train", "sync")


@dataclass
class GRPOResult:
    steps: int = 0
    wall_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES + ("eval",), 0.0))
    interrupted: bool = False
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    nonempty_steps: int = 0  # steps with at least one group whose rewards differ (a non-zero update)


SHUFFLE_ROWS = 8192  # problems mixed across blocks of 1,024 in each epoch's order


def problem_stream(problems_dir: Any, batch: int, seed: int) -> Iterator[list[Problem]]:
    """Train problems from Ray Data, `batch` at a time, forever; each epoch in a new seeded order."""
    from apr_ray.data import problems_dataset

    ds = problems_dataset(problems_dir, "train")
    epoch = 0
    while True:
        produced = False
        # Blocks in a seeded order, rows mixed in a seeded buffer on this process: no task asks for a CPU,
        # which the learner and the generators may all hold (Ray Data's random_shuffle would wait for one).
        epoch_order = ds.randomize_block_order(seed=seed + epoch)
        for table in epoch_order.iter_batches(batch_size=batch, batch_format="pyarrow", drop_last=True,
                                              local_shuffle_buffer_size=SHUFFLE_ROWS, local_shuffle_seed=seed + epoch):
            produced = True
            yield [Problem(int(t), tuple(int(n) for n in nums))
                   for t, nums in zip(table["target"].to_pylist(), table["nums"].to_pylist())]
        if not produced:
            raise ValueError(f"the train split of {problems_dir} has fewer problems than grpo.problems_per_step ({batch})")
        epoch += 1


def rollout_metrics(trees: list[TreeRecord], rewards: list[float], learner_version: int) -> dict[str, float]:
    """Per-step means over the step's trees (prefix added by the caller)."""
    n = max(len(trees), 1)
    lags = [learner_version - t.policy_version for t in trees] or [0]
    correct = [t for t in trees if t.correct]
    # what the critical-path bonus should shorten, and the range of eta it works over (its coef and cap are
    # chosen from that range); absent in a step without a correct tree (not 0)
    on_correct = {
        "correct_critical_path_mean": sum(t.metrics.tokens_critical_path for t in correct) / len(correct),
        "correct_tokens_total_mean": sum(t.metrics.tokens_total for t in correct) / len(correct),
    } | _quartiles("correct_eta", [acceleration_ratio(t) for t in correct]) if correct else {}
    return on_correct | {
        "reward_mean": sum(rewards) / max(len(rewards), 1),
        "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "accuracy": sum(t.correct for t in trees) / n,
        "tokens_total_mean": sum(t.metrics.tokens_total for t in trees) / n,
        "tokens_critical_path_mean": sum(t.metrics.tokens_critical_path for t in trees) / n,
        "threads_per_tree": sum(t.metrics.num_threads for t in trees) / n,
        "spawn_rate": sum(t.metrics.num_spawns > 0 for t in trees) / n,
        "version_lag_mean": sum(lags) / len(lags),
        "version_lag_max": float(max(lags)),
    }


def _quartiles(name: str, values: list[float]) -> dict[str, float]:
    """p25, p50, p75 of `values` (nearest rank): the spread a mean hides."""
    ranked = sorted(values)
    return {f"{name}_p{q}": ranked[min(len(ranked) - 1, len(ranked) * q // 100)] for q in (25, 50, 75)}


class GRPOTrainer:
    """Owns the learner group and the loop; rolls out on the given pool; metrics go to `log(metrics, step)`."""

    def __init__(
        self,
        cfg: RunConfig,
        model_dir: str,
        pool: GeneratorPool,
        *,
        problems_dir: Any,
        checkpoint_dir: Any,
        evaluator: Evaluator,
        log: Callable[[dict[str, float], int], None],
        on_eval: Callable[[int, EvalResult], None] | None = None,
        progress: bool = True,
    ) -> None:
        """`pool` serves the weights in `model_dir` (the caller owns it and shuts it down)."""
        from apr_ray.learner.actor import LearnerGroup
        from apr_ray.weight_sync import ObjectStoreTransport

        self.cfg, self.log, self.on_eval, self.progress = cfg, log, on_eval, progress
        self.evaluator = evaluator
        self.problems_dir, self.checkpoint_dir = problems_dir, checkpoint_dir
        self.transport = ObjectStoreTransport()
        res = cfg.learners
        self.learner = LearnerGroup(cfg.grpo.learner, model_dir, num_learners=res.num_learners,
                                    num_cpus_per_learner=res.cpus_per_learner, num_gpus_per_learner=res.gpus_per_learner)
        self.pool = pool
        self.version = pool.version  # the pool serves this version between steps; each update adds one

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> EvalResult:
        result = self.evaluator.run_pool(self.pool)
        self.log({f"val/{k}": v for k, v in result.metrics.items()}, step)
        if self.on_eval is not None:
            self.on_eval(step, result)
        return result

    # ------------------------------------------------------------------ the loop

    def run(self, evaluate_first: bool = False, resume: bool = False) -> GRPOResult:
        """The GRPO steps; `evaluate_first`: evaluate the starting model at step 0 (the baseline the
        steps are measured against, when no SFT evaluation of the same weights precedes them); `resume`:
        continue after the step of the latest checkpoint in `checkpoint_dir` (see `resume`)."""
        from apr_ray.console import StepProgress

        g = self.cfg.grpo
        result = GRPOResult()
        t0 = time.perf_counter()
        if evaluate_first and g.steps:
            self._timed_eval(0, result)
        problems = problem_stream(self.problems_dir, g.problems_per_step, self.cfg.seed)
        start = self.resume(problems) if resume else 0
        result.steps = start
        bar = StepProgress(g.steps, "grpo", enabled=self.progress, initial=start, every=max(1, g.steps // 20))
        with stop_on_interrupt("grpo") as stop_requested:
            try:
                for step in range(start + 1, g.steps + 1):
                    metrics = self._step(step, problems, result)
                    result.steps = step
                    bar.update(1, reward=f"{metrics['grpo/reward_mean']:.3f}", acc=f"{metrics['grpo/accuracy']:.2f}")
                    if stop_requested():
                        result.interrupted = True
                        break
                    if g.eval_every and step % g.eval_every == 0 and step != g.steps:
                        self._timed_eval(step, result)
                    if g.checkpoint_every and step % g.checkpoint_every == 0 and step != g.steps:
                        self.checkpoint(step)
            except KeyboardInterrupt:  # the second Ctrl-C: the step in flight is abandoned
                result.interrupted = True
            finally:
                bar.close()
        if not result.interrupted:
            self._timed_eval(result.steps, result)
        if result.steps > start:
            self.checkpoint(result.steps)
        result.wall_s = time.perf_counter() - t0
        return result

    def _timed_eval(self, step: int, result: GRPOResult) -> None:
        start = time.perf_counter()
        result.evaluations[step] = self.evaluate(step).metrics
        result.phase_s["eval"] += time.perf_counter() - start

    def _step(self, step: int, problems: Iterator[list[Problem]], result: GRPOResult) -> dict[str, float]:
        g = self.cfg.grpo
        times: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[phase] = now - clock
            result.phase_s[phase] += times[phase]
            clock = now

        membership = self.pool.follow_cluster() if self.cfg.rollout.pool.follow_cluster else {}
        batch = next(problems)  # 1. problems
        lap("problems")
        trees, stats = self.pool.rollout(batch, g.algorithm.group_size, seed=step * 1_000_003)  # 2. rollout
        lap("rollout")
        rewards = [score_tree(t, g.reward).total for t in trees]  # 3. score
        seqs = prepare_sequences(trees, rewards, g.algorithm)
        healthy = [not faulted(t) for t in trees]
        lap("score")
        train = self.learner.grpo_step(seqs, g.algorithm) if seqs else {}  # 4. train
        lap("train")
        self.version += 1  # 5. sync
        handle = self.learner.publish_weights(self.transport, self.version)
        sync_s = self.pool.sync_weights(handle)
        lap("sync")

        step_s = sum(times.values())
        tokens = sum(t.metrics.tokens_total for t in trees)
        out = {f"grpo/{k}": v for k, v in rollout_metrics(trees, rewards, self.version - 1).items()}
        out |= {f"grpo/{k}": float(train[k]) for k in ("loss", "clip_frac", "ratio_mean_first", "approx_kl_sampler",
                                                        "kl_ref", "grad_norm", "lr") if k in train}
        out |= {
            "grpo/rollout_tokens_per_s": tokens / times["rollout"] if times["rollout"] > 0 else 0.0,
            "grpo/learner_tokens_per_s": float(train.get("tokens_per_s", 0.0)),
            "grpo/sync_s": sync_s,
            "grpo/weights_mb": handle.num_bytes / 1e6,
            "grpo/pool_size": float(self.pool.size),
            "grpo/pool_restarts": float(self.pool.restarts),
            "grpo/pool_joined": membership.get("pool_joined", 0.0),
            "grpo/pool_left": membership.get("pool_left", 0.0) + float(stats.lost),
            "grpo/pool_requested": float(self.pool.request_capacity(times["rollout"] / step_s if step_s else 0.0)),
            "grpo/redispatched_requests": float(stats.redispatched),
            "grpo/sequences": float(len(seqs)),
            # groups whose rewards differ: the only ones with a gradient (0 means the update was empty)
            "grpo/informative_groups": 1.0 - sum(flat_groups(rewards, g.algorithm.group_size, healthy))
            / max(len(rewards), 1),
            "grpo/faulted_trees": float(len(trees) - sum(healthy)),
            "grpo/step_s": step_s,
        }
        # Per generator actor: trees served this step and its last weight reload (from the actor itself).
        out |= {f"grpo/generator{aid}_trees": float(n) for aid, n in stats.per_actor_trees.items()}
        reloads = [a["last_reload_s"] for a in self.pool.stats()]
        out["grpo/reload_s_max"] = max(reloads, default=0.0)
        out |= {f"grpo/time_{k}_s": v for k, v in times.items()}
        out |= {f"grpo/share_{k}": v / step_s for k, v in times.items() if step_s > 0}
        result.nonempty_steps += out["grpo/informative_groups"] > 0
        self.log(out, step)
        return out

    # ------------------------------------------------------------------ checkpoints, export, shutdown

    def resume(self, problems: Iterator[list[Problem]]) -> int:
        """Load the latest checkpoint (weights, optimizer, step, policy version), make every generator serve
        its weights, and move the problem stream past the batches its steps used. Returns that step: the
        next one samples the same problems with the same seeds as an uninterrupted run would."""
        from apr_ray.workspace import latest_checkpoint

        ckpt, path = self.checkpoint_dir, latest_checkpoint(self.checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no GRPO checkpoint in {ckpt} (DeepSpeed's 'latest' file is "
                                    "missing); run without --resume to start GRPO afresh")
        client = self.learner.load_checkpoint(ckpt)
        step, self.version = int(client["grpo_step"]), int(client["version"])
        if step > self.cfg.grpo.steps:
            raise ValueError(f"{ckpt}: the checkpoint is at GRPO step {step}, past grpo.steps={self.cfg.grpo.steps}; "
                             "raise grpo.steps to train on")
        self.pool.sync_weights(self.learner.publish_weights(self.transport, self.version))
        for _ in range(step):
            next(problems)
        print(f"grpo: resumed from {path} (step {step}, policy version {self.version})", flush=True)
        return step

    def checkpoint(self, step: int) -> str:
        return self.learner.save_checkpoint(self.checkpoint_dir, {"grpo_step": step, "version": self.version})

    def export(self, out_dir: Any) -> str:
        return self.learner.export_hf(out_dir)

    def shutdown(self) -> None:
        self.learner.shutdown()
