"""Model definitions: the Llama shapes this project trains from scratch, built, seeded and saved in the
Hugging Face layout that transformers, DeepSpeed and vLLM all load.

Owns `ModelConfig` (sizes and numerics, validated before torch is imported), the presets, the mapping
to `transformers.LlamaConfig`, seeded initialisation, saving a complete model directory (safetensors
weights, config.json, generation_config.json, tokenizer) and parameter counting. Must not import Ray,
vLLM or the rollout / learner layers; it may import apr_ray.tokenizer.

Presets:
- tiny: ~1M parameters, for CPU runs on 2 cores (and fast tests);
- small: ~25M parameters, an hour of CPU or minutes of GPU;
- paper: the APR paper's model (shared/research/apr.md §3): hidden 1024, intermediate 2752, 18 layers,
  16 heads (MHA, head_dim 64), 4096 context, untied embeddings, rms_eps 1e-6, rope_theta 10000:
  227.7M non-embedding parameters. The paper's total (293M) is larger because its vocabulary has 32,000
  entries; ours has ~1,250 (docs/tokenizer.md).

Usage: `python -m apr_ray.modeling --preset tiny --out DIR` writes a model directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Head sizes that vLLM's CPU attention backend accepts (vllm/v1/attention/backends/cpu_attn.py); the GPU
# backends accept all of them too. The generator actors load the saved directory in vLLM, so a model
# with any other head size could be trained but never served.
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class ModelConfig(BaseModel):
    """Shape and numerics of a Llama decoder. The vocabulary comes from the tokenizer, not from here."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(..., ge=32, le=16384, description="width of the residual stream")
    intermediate_size: int = Field(..., ge=32, le=65536, description="width of the SwiGLU MLP")
    num_layers: int = Field(..., ge=1, le=128, description="decoder layers")
    num_heads: int = Field(..., ge=1, le=256, description="attention (query) heads")
    num_kv_heads: int = Field(..., ge=1, le=256, description="key/value heads; == num_heads is MHA, fewer is GQA")
    max_position_embeddings: int = Field(..., ge=64, le=131072, description="context window in tokens")
    tie_word_embeddings: bool = Field(False, description="share the input embedding with the LM head")
    rms_norm_eps: float = Field(1e-6, gt=0.0, le=1e-2, description="RMSNorm epsilon")
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency")
    initializer_range: float = Field(0.02, gt=0.0, le=1.0, description="std of the normal weight init")
    seed: int = Field(0, ge=0, description="seed of the weight initialisation")
    number_embedding: Literal["random", "fourier"] = Field(
        "random",
        description="initial embedding of the number tokens (0..999): random, or the value's cosines and sines "
        "over periods 2..1000 in the first fourier_dims dimensions (the rest random)",
    )
    fourier_dims: int = Field(64, ge=2, description="dimensions of a number's embedding that encode its value; even")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the weights as built and saved"
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.number_embedding == "fourier" and (self.fourier_dims % 2 or self.fourier_dims > self.hidden_size):
            raise ValueError(f"fourier_dims ({self.fourier_dims}) must be even and at most hidden_size ({self.hidden_size})")
        if self.head_dim not in VLLM_HEAD_DIMS:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim}, which vLLM cannot serve; "
                f"choose hidden_size and num_heads so that it is one of {VLLM_HEAD_DIMS}"
            )
        return self


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden_size=128,
        intermediate_size=352,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        number_embedding="fourier",
    ),
    "small": ModelConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        max_position_embeddings=4096,
    ),
    "paper": ModelConfig(
        hidden_size=1024,
        intermediate_size=2752,
        num_layers=18,
        num_heads=16,
        num_kv_heads=16,
        max_position_embeddings=4096,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A copy of a preset, so callers can change fields without touching the table."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name].model_copy(deep=True)


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The transformers config: shapes from `cfg`, vocabulary size and special ids from `tokenizer`."""
    from transformers import LlamaConfig

    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)} token; build it with apr_ray.tokenizer")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        dtype=cfg.dtype,
    )


def init_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, device: Literal["cpu", "meta"] = "cpu"
) -> LlamaForCausalLM:
    """A freshly initialised model on the CPU, identical for the same `cfg.seed` on every call and
    every machine (the learner moves it to its device afterwards).

    The global torch RNG is left as it was. `device="meta"` builds the shapes without memory (to count
    parameters of large presets).
    """
    import torch
    from transformers import LlamaForCausalLM

    if device not in ("cpu", "meta"):
        raise ValueError(f"init_model builds on 'cpu' or 'meta', got device={device!r}; move the model afterwards")
    config = llama_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        if cfg.number_embedding == "fourier" and device == "cpu":
            _fourier_number_embedding(model, tokenizer, cfg)
    model = model.to(getattr(torch, cfg.dtype))
    generation = model.generation_config
    generation.bos_token_id = config.bos_token_id
    generation.eos_token_id = config.eos_token_id
    generation.pad_token_id = config.pad_token_id
    return model


def _fourier_number_embedding(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, cfg: ModelConfig) -> None:
    """Write cos(2 pi v / T), sin(2 pi v / T) of each number token's value v into its embedding, periods T
    spread geometrically over 2..1000, at the scale of the random init.

    A number is one token (0..999), so every sum the model writes is a separate fact to recall; with
    value-aware embeddings a + b is a rotation of a's features by b's, which a gated MLP can compute
    instead of memorise (Fourier number embeddings, Zhou et al. 2025). With a tied head the output
    side inherits the same structure, so a near miss is near in value. It only sets the start: the
    embedding trains as before, and the saved model is a plain Llama.
    """
    import math

    import torch

    pairs = cfg.fourier_dims // 2
    periods = torch.logspace(math.log10(2.0), 3.0, pairs, dtype=torch.float64)
    ids, values = [], []
    for token, token_id in tokenizer.get_vocab().items():
        if token.isdigit():
            ids.append(token_id)
            values.append(int(token))
    angles = 2 * math.pi * torch.tensor(values, dtype=torch.float64)[:, None] / periods[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1) * (cfg.initializer_range * math.sqrt(2))
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[torch.tensor(ids), : cfg.fourier_dims] = features.to(weight.dtype)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameter counts. Non-embedding excludes the token embedding and the LM
    head (the paper's convention); a tied head is counted once in the total."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embedding_params = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        embedding_params[id(head.weight)] = head.weight
    return total, total - sum(p.numel() for p in embedding_params.values())


def save_pretrained(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write a complete model directory: model.safetensors, config.json, generation_config.json (eos and
    pad set) and the tokenizer. Both `AutoModelForCausalLM.from_pretrained` and vLLM load it."""
    from apr_ray.tokenizer import save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m apr_ray.modeling", description="Build a freshly initialised model directory."
    )
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, help="directory to write; omit to only print parameter counts")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's init seed")
    args = parser.parse_args(argv)

    cfg = get_preset(args.preset)
    if args.seed is not None:
        cfg = ModelConfig.model_validate({**cfg.model_dump(), "seed": args.seed})

    from apr_ray.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    # Counting alone needs no memory; writing needs real weights.
    model = init_model(cfg, tokenizer, device="cpu" if args.out else "meta")
    total, non_embedding = count_parameters(model)
    report = {"preset": args.preset, "vocab_size": len(tokenizer), "total_params": total,
              "non_embedding_params": non_embedding, "config": cfg.model_dump()}
    if args.out:
        report["out"] = str(save_pretrained(model, tokenizer, args.out))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
