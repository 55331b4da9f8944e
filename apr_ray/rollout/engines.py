"""Generation engines behind one async interface: what the thread-tree runtime calls to decode a request.

Owns the interface (`Engine.generate(prompt_ids, max_new_tokens, sampling) -> GenerationResult`), the
sampling settings, the prompt encoding shared by the runtime and the replay engine, and two engines:
- `ReplayEngine`: no model; answers each prompt with the completion a solver demonstration holds for it
  (exact tests of the spawn/join logic, benchmarks that need a realistic tree shape);
- `TransformersEngine`: a Hugging Face causal LM with a KV cache, requests collected into batches by a
  small async batcher; torch + transformers only, for machines without vLLM and as a reference in tests.
The vLLM engine of the generator actors is in `vllm_engine.py`.

Conventions every engine keeps:
- token ids in, token ids out; the engine never sees text;
- a request ends at EOS (the EOS id is the last output id, with its logprob: the policy learns to end its
  requests) or after `max_new_tokens`;
- `logprobs[i]` is the log-probability of `output_ids[i]` under the model's unmodified distribution
  (temperature 1, no top-k/top-p), which is what the learner recomputes (vLLM's "raw_logprobs");
- cancelling the awaiting task cancels the request.

Must not import Ray or vLLM; torch and transformers are imported only by `TransformersEngine`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
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


def _check_request(prompt_ids: list[int], max_new_tokens: int) -> None:
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
        _check_request(prompt_ids, max_new_tokens)
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


# --- transformers -------------------------------------------------------------------------------


@dataclass
class _Pending:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    ignore_eos: bool
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)  # read by the decoding thread


class TransformersEngine(Engine):
    """Batched generation on a Hugging Face causal LM with a KV cache.

    Requests that arrive while the model is busy (or within `max_wait_s` of the first) are decoded as
    one batch: prompts left-padded, one prefill, then one forward per step for the whole batch until every
    row has ended. A batch runs in a worker thread, so the event loop keeps serving the runtime; rows whose
    task was cancelled stop at the next step. Static batching (no request joins a running batch) keeps it
    small and exact: greedy output equals `model.generate` on each prompt alone.
    """

    def __init__(
        self,
        model: Any,
        *,
        eos_token_id: int,
        pad_token_id: int = 0,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # size of every batch decoded (tests and benchmarks read it)
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        _check_request(prompt_ids, max_new_tokens)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        pending = _Pending(list(prompt_ids), max_new_tokens, sampling, ignore_eos,
                           asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled.set()
            raise

    async def _serve(self) -> None:
        while self._pending:
            await asyncio.sleep(self.max_wait_s)  # let siblings spawned in the same step join the batch
            batch = [p for p in self._pending[: self.max_batch_size] if not p.cancelled.is_set()]
            del self._pending[: self.max_batch_size]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self._decode_batch, batch)
            except Exception as err:  # the engine failed: every request of the batch reports it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    async def reload_weights(self, named_tensors: Any, version: int) -> int:
        """Load new weights in place (the generator calls this only with no request in flight)."""
        import torch

        params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"weight {name!r} is not a parameter of the served model")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return version

    def _decode_batch(self, batch: list[_Pending]) -> list[GenerationResult]:
        import torch

        device = next(self.model.parameters()).device
        rows, width = len(batch), max(len(p.prompt_ids) for p in batch)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding: every row's next token lands in the last column
            input_ids[i, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            mask[i, width - len(p.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [_generator(p.sampling.seed, device) for p in batch]
        outputs: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        finish: list[FinishReason] = ["length"] * rows
        done = [False] * rows
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            next_pos = positions[:, -1:] + 1
            for _ in range(max(p.max_new_tokens for p in batch)):
                logits = out.logits[:, -1, :].float()
                tokens = _sample(logits, batch, generators)
                raw = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
                token_list, raw_list = tokens.tolist(), raw.tolist()
                for i, p in enumerate(batch):
                    if done[i]:
                        continue
                    outputs[i].append(token_list[i])
                    logprobs[i].append(raw_list[i])
                    if token_list[i] == self.eos_token_id and not p.ignore_eos:
                        done[i], finish[i] = True, "eos"
                    elif len(outputs[i]) >= p.max_new_tokens or p.cancelled.is_set():
                        done[i] = True
                if all(done):
                    break
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                out = self.model(
                    input_ids=tokens.unsqueeze(1).to(device),
                    attention_mask=mask,
                    position_ids=next_pos,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                next_pos = next_pos + 1
        return [GenerationResult(o, lp, f) for o, lp, f in zip(outputs, logprobs, finish)]


def _generator(seed: int | None, device: Any) -> Any:
    if seed is None:
        return None
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _sample(logits: Any, batch: list[_Pending], generators: list[Any]) -> Any:
    """One token per row: argmax for greedy rows, else temperature / top-k / top-p sampling."""
    import torch

    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(batch):
        s = p.sampling
        if s.temperature == 0.0:
            continue
        row = logits[i] / s.temperature
        if 0 < s.top_k < row.numel():
            kth = torch.topk(row, s.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
            probs = probs.scatter(0, order[drop], 0.0)
            probs = probs / probs.sum()
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i]).item()
    return tokens
