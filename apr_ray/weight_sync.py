"""Moving full weights from the learner to the generators, versioned.

Owns the `WeightTransport` interface (learner side: `publish(state_dict, version) -> WeightHandle`;
generator side: `receive(handle) -> [(name, tensor)]`), its one implementation over the Ray object
store, and `WeightReceiver`, which applies handles on a generator in version order and records the
version it serves. Loading into an engine is the caller's function (for vLLM:
`apr_ray.rollout.vllm_ext.reload_weights`). Must not import vLLM, DeepSpeed or the learner.

Object-store transport: the learner gathers the full weights once (rank 0), `ray.put`s them once as
one object (one numpy buffer per tensor, so Ray stores them without pickling the data), and every
generator `ray.get`s that object: on the learner's node a zero-copy read from shared memory, on other
nodes one transfer per node. Receivers get read-only views and must copy (vLLM's loader does).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

NamedTensors = list[tuple[str, Tensor]]


@dataclass(frozen=True)
class WeightHandle:
    """What the trainer passes to generators: a published set of weights and its version."""

    version: int  # policy version; increases with every publish
    num_tensors: int
    num_bytes: int
    ref: Any  # transport-specific locator (an ObjectRef for ObjectStoreTransport)


class WeightTransport(ABC):
    """How full weights get from the learner to the generators."""

    @abstractmethod
    def publish(self, state_dict: Mapping[str, Tensor], version: int) -> WeightHandle:
        """Make `state_dict` (full weights, HF names) available to generators as `version`."""

    @abstractmethod
    def receive(self, handle: WeightHandle) -> NamedTensors:
        """The published weights as (name, tensor) pairs, on the generator side."""


@dataclass(frozen=True)
class WireTensor:
    """One tensor as raw bytes: numpy cannot hold bf16, and raw bytes let Ray skip pickling the data."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, C-contiguous


def to_wire(state_dict: Mapping[str, Tensor]) -> list[WireTensor]:
    """CPU tensors -> byte views (no copy for contiguous CPU tensors)."""
    out = []
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        dtype = str(t.dtype).removeprefix("torch.")
        out.append(WireTensor(name, dtype, tuple(t.shape), flat.view(torch.uint8).numpy()))
    return out


def from_wire(items: Sequence[WireTensor]) -> NamedTensors:
    """Byte views -> tensors sharing their memory (read-only when it is the object store's)."""
    out = []
    with warnings.catch_warnings():
        # Views of Ray's read-only shared memory: torch warns that they are not writable, and that is
        # the contract (receivers copy).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for w in items:
            dtype = getattr(torch, w.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"tensor {w.name!r}: unknown dtype {w.dtype!r}")
            out.append((w.name, torch.from_numpy(w.data).view(dtype).reshape(w.shape)))
    return out


class ObjectStoreTransport(WeightTransport):
    """One `ray.put` per version; generators `ray.get` it. Stateless, so it can travel to any actor.

    The object lives as long as some handle refers to it: the trainer keeps the latest handle (for
    generators that join later) and drops the older ones.
    """

    def publish(self, state_dict: Mapping[str, Tensor], version: int) -> WeightHandle:
        import ray

        if not state_dict:
            raise ValueError(f"publish(version={version}): empty state_dict (called on a rank other than 0?)")
        wire = to_wire(state_dict)
        ref = ray.put(wire)
        return WeightHandle(
            version=version,
            num_tensors=len(wire),
            num_bytes=sum(w.data.nbytes for w in wire),
            ref=ref,
        )

    def receive(self, handle: WeightHandle) -> NamedTensors:
        import ray

        return from_wire(ray.get(handle.ref))


class WeightReceiver:
    """Generator side: applies published weights in version order and records the version served.

    `load(named_tensors, version)` must replace the engine's weights as one operation between two
    engine steps (vLLM's worker reload does); a handle older than or equal to the served version is
    skipped, so a late message never rolls a generator back.
    """

    def __init__(self, transport: WeightTransport, load: Callable[[NamedTensors, int], Any], version: int = -1):
        self.transport = transport
        self.load = load
        self.version = version

    def apply(self, handle: WeightHandle) -> bool:
        """Load `handle`'s weights if they are newer than the served ones; True when loaded."""
        if handle.version <= self.version:
            return False
        self.load(self.transport.receive(handle), handle.version)
        self.version = handle.version
        return True
