"""In-place weight reload for a running vLLM engine (vLLM 0.32), versioned.

`WeightReloadExtension` is a vLLM worker extension: start the engine with
`worker_extension_cls="apr_ray.rollout.vllm_ext.WeightReloadExtension"` and vLLM mixes it into every
worker, so its methods are reachable with `collective_rpc(<method name>, args=...)`. Passing a method
name (not a function) keeps `VLLM_ALLOW_INSECURE_SERIALIZATION` off. With an in-process engine
(`vllm.LLM` and `VLLM_ENABLE_V1_MULTIPROCESSING=0`) the (name, tensor) pairs reach the worker as they
are; across vLLM's engine-core process boundary (AsyncLLM) tensors do not survive its msgpack, and
`apr_ray.rollout.vllm_engine.WireReloadExtension` sends raw bytes to the same reload instead.

The reload goes through the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`
(vLLM's layerwise in-place reload, which also works on the CPU backend; the older
`model_runner.model.load_weights` fails there), then re-processes a tied LM head, which that reload
leaves stale. It runs inside one engine-core utility call, between two engine steps, so no forward pass
sees half the new weights; requests still running at that moment continue on the new weights (pause the
engine first where that matters). The prefix cache holds KV of the old weights: reset it after a reload.

This module is imported inside vLLM worker processes: it must not import Ray or other apr_ray modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

RELOAD_METHOD = "apr_reload_weights"
VERSION_METHOD = "apr_weight_version"


class WeightReloadExtension:
    """Mixed into vLLM's worker class (so `self` is the worker); names are prefixed to avoid clashes."""

    _apr_version: int = -1
    _apr_names: frozenset[str] | None = None

    def apr_reload_weights(self, named_tensors: Sequence[Sequence[Any]], version: int) -> int:
        """Load full weights (HF checkpoint names) as `version`; returns the version now served.

        Refuses a version not newer than the served one, and a set of names different from the first
        reload's (a partial set would leave the model half-updated).
        """
        if version <= self._apr_version:
            raise ValueError(f"weight version {version} is not newer than the one served ({self._apr_version})")
        pairs = [(str(name), tensor) for name, tensor in named_tensors]  # msgpack turns tuples into lists
        names = frozenset(n for n, _ in pairs)
        if len(names) != len(pairs):
            raise ValueError(f"weight version {version}: {len(pairs) - len(names)} duplicate tensor names")
        if self._apr_names is not None and names != self._apr_names:
            missing = sorted(self._apr_names - names)[:5]
            extra = sorted(names - self._apr_names)[:5]
            raise ValueError(
                f"weight version {version}: names differ from the first reload's"
                f" (missing {missing}, unexpected {extra})"
            )
        for name, t in pairs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weight version {version}: {name!r} is a {type(t).__name__}, not a tensor")
        self.reload_weights(weights_iterator=iter(pairs), is_checkpoint_format=True)
        self._apr_reprocess_tied_embeddings()
        self._apr_names = names
        self._apr_version = version
        return version

    def _apr_reprocess_tied_embeddings(self) -> None:
        """Redo the post-load processing of embedding layers that share their weight (a tied LM head).

        vLLM 0.32's layerwise reload only processes layers that received a tensor; a tied LM head gets
        none (the checkpoint has no lm_head.weight), and on the CPU backend it keeps computing logits
        from a packed copy of the old embedding. Measured here: without this, a tied model served stale
        logits after every reload. For an unquantized embedding on GPU the processing is a no-op.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        sharing: dict[int, list[torch.nn.Module]] = {}
        for module in self.model_runner.get_model().modules():
            if isinstance(module, VocabParallelEmbedding):
                sharing.setdefault(id(module.weight), []).append(module)
        for modules in sharing.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)

    def apr_weight_version(self) -> int:
        """The version last loaded by apr_reload_weights; -1 for the weights the engine started with."""
        return self._apr_version


def reload_weights(llm: Any, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int) -> list[int]:
    """Reload every worker of an in-process `vllm.LLM` and reset its prefix cache; the versions served."""
    versions = llm.collective_rpc(RELOAD_METHOD, args=(list(named_tensors), version))
    llm.reset_prefix_cache()
    return versions


def weight_versions(llm: Any) -> list[int]:
    """The weight version each worker of a `vllm.LLM` serves."""
    return llm.collective_rpc(VERSION_METHOD)
