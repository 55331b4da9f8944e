"""Generation engines behind one async interface: what the thread-tree runtime calls to decode a request.

Owns the interface (`Engine.generate(prompt_ids, max_new_tokens, sampling) -> GenerationResult`), the
sampling settings, the prompt encoding shared by the runtime and the replay engine, and `ReplayEngine`: no
model; it answers each prompt with the completion a solver demonstration holds for it (exact tests of the
spawn/join logic, benchmarks that need a realistic tree shape). The engines that run a model are in
`transformers_engine.py` (a Hugging Face causal LM with continuous batching, torch + transformers only) and
`vllm_engine.py` (the generator actors').

Conventions every engine keeps:
- token ids in, token ids out; the engine never sees text;
- a request ends at EOS (the EOS id is the last output id, with its logprob: the policy learns to end its
  requests) or after `max_new_tokens`;
- `logprobs[i]` is the log-probability of `output_ids[i]` under the model's unmodified distribution
  (temperature 1, no top-k/top-p), which is what the learner recomputes (vLLM's "raw_logprobs");
- cancelling the awaiting task cancels the request.

Must not import Ray, vLLM, torch or transformers: the runtime and the configs import it.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from apr_ray.countdown.demos import Demo

FinishReason = Literal["eos", "length"]


class SamplingConfig(BaseModel):
    """How tokens are drawn. temperature 0 is greedy."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=100.0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass; 1 = off")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens; 0 = off")
    seed: int | None = Field(
        None,
        description="base seed; each request's seed is derived from it, the tree's seed and the request's "
        "place in the tree (so results do not depend on scheduling); None = unseeded",
    )


@dataclass
class GenerationResult:
    output_ids: list[int]  # sampled ids; ends with the EOS id when finish_reason == "eos"
    logprobs: list[float]  # one per output id
    finish_reason: FinishReason


class Engine(ABC):
    """An async token-in, token-out generator. Many requests may be in flight at once."""

    eos_token_id: int

    @abstractmethod
    async def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        *,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Decode one request. `sampling.seed` is this request's own seed. `ignore_eos` generates exactly
        `max_new_tokens` (benchmarks). Raises on engine failure; the runtime records it as an error."""

    @property
    def dead(self) -> bool:
        """Whether the engine can no longer serve any request (its process died): then every request ends
        in ERROR, and the actor holding it should be replaced rather than asked again."""
        return False


def request_seed(base: int | None, tree_seed: int, thread_id: int, segment: int) -> int | None:
    """A request's seed from the run's base seed and its place in the tree; None when unseeded."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{tree_seed}:{thread_id}:{segment}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class TextCodec:
    """Text <-> ids for the runtime: the tokenizer's Rust backend when it has one (the Python wrapper's
    per-id validation costs more than the encoding itself), its plain methods otherwise."""

    def __init__(self, tokenizer: Any):
        self.bos_token_id: int = tokenizer.bos_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; the backend encodes them in parallel."""
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Special tokens (BOS, PAD, ...) carry no text and are dropped."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def encode_prompt(codec: TextCodec, text: str, add_bos: bool) -> list[int]:
    """The ids of a request's prompt: the runtime and the replay engine must agree on them exactly."""
    ids = codec.encode(text)
    return [codec.bos_token_id, *ids] if add_bos else ids


def check_request(prompt_ids: list[int], max_new_tokens: int) -> None:
    """Refuse a request no engine can decode: an empty prompt, or nothing to generate."""
    if not prompt_ids:
        raise ValueError("empty prompt: a request needs at least one prompt token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


# --- replay -------------------------------------------------------------------------------------


class ReplayMiss(LookupError):
    """The replay engine holds no demonstration for the prompt it was sent."""


class ReplayEngine(Engine):
    """Answers each prompt with the completion a demonstration holds for exactly that prompt, then EOS.

    Logprobs are 0.0 (the demonstration is certain). A prompt no demonstration holds raises ReplayMiss.
    """

    def __init__(self, completions: dict[tuple[int, ...], list[int]], eos_token_id: int):
        self.completions = completions
        self.eos_token_id = eos_token_id
        self.requests = 0  # how many requests it answered (tests count them)

    @classmethod
    def from_demos(cls, demos: Iterable[Demo], tokenizer: Any, add_bos: bool = True) -> ReplayEngine:
        """An engine for flattened demonstrations (`countdown.demos.flatten_apr` / `flatten_sosp`)."""
        codec = TextCodec(tokenizer)
        seqs = [(demo, seq) for demo in demos for seq in demo.sequences]
        prompts = codec.encode_many([seq.prompt for _, seq in seqs])
        bos = [codec.bos_token_id] if add_bos else []
        completions: dict[tuple[int, ...], list[int]] = {}
        for (demo, seq), prompt, ids in zip(seqs, prompts, codec.encode_many([seq.completion for _, seq in seqs])):
            if completions.setdefault(tuple(bos + prompt), ids) != ids:
                raise ValueError(
                    f"two demonstrations answer the same prompt differently (problem "
                    f"{demo.problem.problem_id}, thread {seq.thread_id}): {seq.prompt[:120]!r}"
                )
        return cls(completions, tokenizer.eos_token_id)

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        check_request(prompt_ids, max_new_tokens)
        await asyncio.sleep(0)  # a real suspension point: concurrent requests interleave as with a model
        completion = self.completions.get(tuple(prompt_ids))
        if completion is None:
            raise ReplayMiss(
                f"no demonstration holds this prompt ({len(prompt_ids)} tokens, first ids {prompt_ids[:12]})"
            )
        self.requests += 1
        out = [*completion, self.eos_token_id]
        finish: FinishReason = "eos"
        if len(out) > max_new_tokens:
            out, finish = out[:max_new_tokens], "length"
        return GenerationResult(out, [0.0] * len(out), finish)
