"""Learner ranks as Ray actors, and the group that drives them as one data-parallel learner.

Owns the process-group rendezvous (rank 0's node IP and a free port there), the split of a batch over
ranks (whole trees per rank, balanced by tokens) and the fan-out of every call to all ranks. The
training itself is `apr_ray.learner.engine.Learner`; this module adds no logic to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from apr_ray.grpo import GRPOConfig
from apr_ray.learner.engine import DistInfo, Learner, LearnerConfig, free_port
from apr_ray.types import TrainSequence
from apr_ray.weight_sync import WeightHandle, WeightTransport


def split_by_tree(seqs: Sequence[TrainSequence], num_ranks: int) -> list[list[TrainSequence]]:
    """Sequences per rank: all sequences of a tree on one rank, ranks balanced by token count.

    A sequence with tree_index < 0 (an SFT demonstration) is a unit of its own. Trees go, largest
    first, to the rank with the fewest tokens so far; order within a rank follows the input.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    units: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(seqs):
        key = (0, s.tree_index) if s.tree_index >= 0 else (1, i)
        units.setdefault(key, []).append(i)
    size = {k: sum(len(seqs[i].prompt_ids) + len(seqs[i].output_ids) for i in idx) for k, idx in units.items()}
    load = [0] * num_ranks
    owner: dict[int, int] = {}
    for key in sorted(units, key=lambda k: -size[k]):
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        load[rank] += size[key]
        for i in units[key]:
            owner[i] = rank
    out: list[list[TrainSequence]] = [[] for _ in range(num_ranks)]
    for i, s in enumerate(seqs):
        out[owner[i]].append(s)
    return out


class LearnerWorker:
    """One rank: builds its `Learner` once the rendezvous address is known (a Ray actor via LearnerActor)."""

    def __init__(self, cfg: LearnerConfig, model_dir: str, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.rank = rank
        self.world_size = world_size
        self._learner: Learner | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it: rank 0's answer is every rank's MASTER_ADDR/PORT."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the engine; blocks until every rank has called it."""
        dist = DistInfo(self.rank, self.world_size, master_addr, master_port, local_rank=0)
        self._learner = Learner(self.cfg, self.model_dir, dist)

    @property
    def learner(self) -> Learner:
        if self._learner is None:
            raise RuntimeError(f"learner rank {self.rank}: setup() has not run")
        return self._learner

    def sft_step(self, seqs: list[TrainSequence]) -> dict[str, float]:
        return self.learner.sft_step(seqs)

    def grpo_step(self, seqs: list[TrainSequence], grpo: GRPOConfig) -> dict[str, float]:
        return self.learner.grpo_step(seqs, grpo)

    def save_checkpoint(self, ckpt_dir: str, client_state: dict[str, Any] | None) -> str:
        return self.learner.save_checkpoint(ckpt_dir, client_state)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None) -> dict[str, Any]:
        return self.learner.load_checkpoint(ckpt_dir, tag)

    def export_hf(self, out_dir: str) -> str | None:
        path = self.learner.export_hf(out_dir)
        return None if path is None else str(path)

    def full_state_dict(self) -> dict[str, Any]:
        return self.learner.full_state_dict()

    def publish_weights(self, transport: WeightTransport, version: int) -> WeightHandle | None:
        """Gather the full weights (every rank takes part) and publish them from rank 0."""
        state = self.learner.full_state_dict()
        return transport.publish(state, version) if self.rank == 0 else None

    def step(self) -> int:
        return self.learner.step


LearnerActor = ray.remote(LearnerWorker)


class LearnerDied(RuntimeError):
    """A learner rank died: the step it was in cannot finish (its peers wait for it in a collective)."""


class LearnerGroup:
    """N learner actors forming one DeepSpeed process group; every method is a collective over them.

    Metrics come back from rank 0; they are already summed / averaged over all ranks by the learner.
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str | Path,
        num_learners: int = 1,
        num_cpus_per_learner: float = 1.0,
        num_gpus_per_learner: float = 0.0,
    ) -> None:
        if num_learners < 1:
            raise ValueError(f"num_learners must be >= 1, got {num_learners}")
        self.cfg = cfg
        options = {"num_cpus": num_cpus_per_learner, "num_gpus": num_gpus_per_learner}
        self.actors = [
            LearnerActor.options(**options).remote(cfg, str(model_dir), rank, num_learners)
            for rank in range(num_learners)
        ]
        addr, port = ray.get(self.actors[0].rendezvous_address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every rank's result, failing fast: when one rank dies the others would wait for it in their
        collective until the process-group timeout (`dist_timeout_s`, 30 min), so the first death stops
        the group and raises `LearnerDied` naming the rank and the call."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                rank = rank_of[done[0]]
                self.shutdown()
                raise LearnerDied(
                    f"learner rank {rank} of {len(refs)} died during {what}; the group is stopped (its other "
                    f"ranks would wait for it until learner.dist_timeout_s). The stage's last checkpoint "
                    f"(output_dir/sft|grpo/checkpoints, every *.checkpoint_every steps) holds the state up to its "
                    f"step; `apr-ray grpo --resume` continues GRPO from it. Cause: {err}") from None
        return ray.get(refs)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._gather([getattr(a, method).remote(*args) for a in self.actors], method)

    def sft_step(self, seqs: Sequence[TrainSequence]) -> dict[str, float]:
        shares = split_by_tree(seqs, self.world_size)
        return self._gather([a.sft_step.remote(s) for a, s in zip(self.actors, shares)], "an SFT step")[0]

    def grpo_step(self, seqs: Sequence[TrainSequence], grpo: GRPOConfig) -> dict[str, float]:
        shares = split_by_tree(seqs, self.world_size)
        return self._gather([a.grpo_step.remote(s, grpo) for a, s in zip(self.actors, shares)], "a GRPO step")[0]

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict[str, Any] | None = None) -> str:
        return self._all("save_checkpoint", str(ckpt_dir), client_state)[0]

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Any]:
        return self._all("load_checkpoint", str(ckpt_dir), tag)[0]

    def export_hf(self, out_dir: str | Path) -> str:
        return self._all("export_hf", str(out_dir))[0]

    def full_state_dict(self) -> dict[str, Any]:
        return self._all("full_state_dict")[0]

    def publish_weights(self, transport: WeightTransport, version: int) -> WeightHandle:
        return self._all("publish_weights", transport, version)[0]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
