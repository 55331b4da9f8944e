"""`TransformersEngine`: a Hugging Face causal LM decoded with continuous batching over a preallocated KV
cache, torch + transformers only. For evaluation in the plain script and during SFT, GRPO rollouts on
machines without vLLM, and as a reference in tests; it keeps every convention of `engines.Engine`.

Owns the engine (the event-loop side: requests queued, answered, cancelled), the decoding thread's batch
(`_Batch`: live rows, their slot KV cache, masks and positions) and the sampler. Must not import Ray or vLLM.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from apr_ray.rollout.engines import Engine, FinishReason, GenerationResult, SamplingConfig, check_request


@dataclass
class _Pending:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    ignore_eos: bool
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)  # read by the decoding thread


class TransformersEngine(Engine):
    """Continuous batching on a Hugging Face causal LM with a preallocated KV cache.

    One decoding thread runs while there is work, so the event loop keeps serving the runtime. At every
    step boundary it admits the requests that arrived, up to `max_batch_size` live rows: their prompts are
    prefilled together (left-padded) straight into the cache, and they join the running rows. One forward
    then decodes a token for every live row; a row that ends (EOS, `max_new_tokens`, or its task was
    cancelled) leaves at once and its result is delivered while the others go on, so a step only computes
    live rows and a child thread never waits for its parent's batch to drain. `max_wait_s`: how long an
    idle engine waits before its first prefill, so that siblings spawned in the same step share it.

    Exact: every row attends only to its own tokens at its own positions, so greedy output equals
    `model.generate` on each prompt alone; a seeded row draws with its own generator only, so a seeded
    request's output does not depend on what it was batched with.
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
        # read by tests and benchmarks: requests admitted together (one prefill each), decode steps run
        self.batch_sizes: list[int] = []
        self.decode_steps = 0
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()  # guards _pending and _running between the event loop and the thread
        self._running = False  # a decoding thread is running or about to; only it clears the flag
        self._worker: asyncio.Task | None = None

    async def generate(self, prompt_ids, max_new_tokens, sampling, *, ignore_eos=False):
        check_request(prompt_ids, max_new_tokens)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        pending = _Pending(list(prompt_ids), max_new_tokens, sampling, ignore_eos,
                           asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending.append(pending)
            start, self._running = not self._running, True
        if start:
            self._worker = asyncio.create_task(self._serve())
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.cancelled.set()
            raise

    async def _serve(self) -> None:
        try:
            await asyncio.sleep(self.max_wait_s)  # let siblings spawned in the same step share the first prefill
        except asyncio.CancelledError:  # the loop closes before a thread started: the next request starts one
            with self._lock:
                self._running = False
            raise
        # shielded: a closing event loop must not cancel the job before it runs (the flag would stay set with
        # no thread to clear it); the loop's shutdown waits for the thread, which drops cancelled rows and ends
        job = asyncio.get_running_loop().run_in_executor(None, self._decode_loop)
        try:
            await asyncio.shield(job)
        except Exception as err:  # a bug in the loop's own bookkeeping: nobody may wait forever
            with self._lock:
                stranded, self._pending, self._running = self._pending, [], False
            for p in stranded:
                _settle(p, error=err)
            raise

    def _decode_loop(self) -> None:
        batch = _Batch(self.model, self.eos_token_id, self.pad_token_id, self.max_batch_size)
        with torch.inference_mode():
            while True:
                with self._lock:
                    room = self.max_batch_size - len(batch.rows)
                    admitted, self._pending[:room] = self._pending[:room], []
                    if not admitted and not batch.rows:
                        self._running = False
                        return
                admitted = [p for p in admitted if not p.cancelled.is_set()]
                try:
                    if admitted:
                        self.batch_sizes.append(len(admitted))
                        _settle_all(batch.admit(admitted))
                    if batch.rows:
                        self.decode_steps += 1
                        _settle_all(batch.step())
                except Exception as err:  # the engine failed: every request it holds reports it
                    held = {id(p): p for p in [*admitted, *(row.request for row in batch.rows)]}
                    for p in held.values():
                        _settle(p, error=err)  # a request already answered keeps its answer
                    batch = _Batch(self.model, self.eos_token_id, self.pad_token_id, self.max_batch_size)

    async def reload_weights(self, named_tensors: Any, version: int) -> int:
        """Load new weights in place (the generator calls this only with no request in flight)."""
        params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"weight {name!r} is not a parameter of the served model")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return version


def _settle(p: _Pending, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
    """Answer a request from the decoding thread, on its own event loop."""

    def resolve() -> None:
        if p.future.done():  # cancelled, or answered before
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(result)

    try:
        p.future.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # its event loop is closed: nobody waits for the answer any more
        pass


def _settle_all(done: list[tuple[_Pending, GenerationResult]]) -> None:
    for p, result in done:
        _settle(p, result)


@dataclass
class _Row:
    """A request being decoded (decoding thread only)."""

    request: _Pending
    generator: Any  # torch.Generator for a seeded sampled request, else None
    start: int  # the cache column of its first prompt token
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None

    def record(self, token: int, logprob: float, eos_token_id: int) -> bool:
        """Append one sampled token; True when the request has ended."""
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if token == eos_token_id and not self.request.ignore_eos:
            self.finish = "eos"
        elif len(self.output_ids) >= self.request.max_new_tokens:
            self.finish = "length"
        return self.finish is not None


@dataclass
class _Frame:
    """What the next forward touches in the slot cache: rows [r0, r1) attend to their past in columns
    [c0, c1) and write their new keys and values from column c1 on. `slots` x `columns` is the capacity
    every layer's buffers are allocated with."""

    slots: int = 0
    columns: int = 0
    r0: int = 0
    r1: int = 0
    c0: int = 0
    c1: int = 0


class _SlotLayer(DynamicLayer):
    """One layer's keys and values in [slots, kv heads, columns, head dim] buffers, written in place
    (DynamicLayer concatenates, which copies the whole cache at every step). The mask sizes transformers
    derives from `get_seq_length` stay right because the frame says how long the past is."""

    def __init__(self, frame: _Frame):
        super().__init__()
        self.frame = frame
        self.k_buf: Any = None
        self.v_buf: Any = None

    def update(self, key_states, value_states, *args, **kwargs):
        f = self.frame
        if self.k_buf is None:
            self.k_buf = key_states.new_zeros((f.slots, key_states.shape[1], f.columns, key_states.shape[3]))
            self.v_buf = value_states.new_zeros((f.slots, value_states.shape[1], f.columns, value_states.shape[3]))
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        end = f.c1 + key_states.shape[2]
        self.k_buf[f.r0 : f.r1, :, f.c1 : end] = key_states
        self.v_buf[f.r0 : f.r1, :, f.c1 : end] = value_states
        self.keys = self.k_buf[f.r0 : f.r1, :, f.c0 : end]
        self.values = self.v_buf[f.r0 : f.r1, :, f.c0 : end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.frame.c1 - self.frame.c0


def _slot_cache(frame: _Frame) -> Cache:
    """A transformers `Cache` whose layers write into preallocated buffers at `frame`'s columns; layers are
    created as the model first calls them, so any number of layers and any head shape works."""
    return Cache(layer_class_to_replicate=lambda: _SlotLayer(frame))


def _headroom(width: int) -> int:
    """Free columns to leave after a reallocation, so the window is copied at most once every width / 4 steps."""
    return max(64, width // 4)


class _Batch:
    """The live rows and their KV cache, owned by the decoding thread.

    Slot i of the cache and of every per-row tensor holds `rows[i]`. A row that ends is replaced by the
    last live row (only moved rows are copied), so a step computes live rows only. All rows write their
    next token at the same cache column `n`; a row's past is columns [start, n) (its mask is 0 before
    `start`), and a step reads the window [lo, n), lo being the smallest start. Columns are places in a
    buffer, not token positions (positions are passed explicitly): a joining row's prompt is placed to end
    at column n, and when the window reaches the buffer's end it is copied to a new buffer's start.
    """

    def __init__(self, model: Any, eos_token_id: int, pad_token_id: int, max_rows: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_rows = max_rows
        self.rows: list[_Row] = []
        self.lo = self.n = 0
        self.frame = _Frame()
        self.cache = _slot_cache(self.frame)
        self.mask: Any = None  # [slots, columns] 1 where a row has a token
        self.next_ids: Any = None  # [slots] the token each row feeds next
        self.next_pos: Any = None  # [slots] its position
        self._reallocate(0, 0, 0)

    def admit(self, requests: list[_Pending]) -> list[tuple[_Pending, GenerationResult]]:
        """Prefill `requests` into new rows and sample their first tokens; returns those already ended."""
        k, width = len(requests), max(len(p.prompt_ids) for p in requests)
        self._make_room(k, width)
        first, n, old_lo = len(self.rows), self.n, self.lo
        ids = torch.full((k, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((k, width), dtype=torch.long)
        for i, p in enumerate(requests):  # left padding: every prompt ends at column n
            ids[i, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
            mask[i, width - len(p.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask[first : first + k] = 0
        self.mask[first : first + k, n - width : n] = mask
        self.next_pos[first : first + k] = positions[:, -1] + 1
        rows = [_Row(p, _generator(p.sampling.seed, self.device), n - len(p.prompt_ids)) for p in requests]
        self.rows.extend(rows)
        self.lo = min(old_lo, *(row.start for row in rows)) if first else min(row.start for row in rows)
        if first and self.lo < old_lo:  # the window widens: older rows have no tokens in the new columns
            self.mask[:first, self.lo : old_lo] = 0
        self._frame(first, first + k, n - width, n - width)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return self._advance(out.logits[:, -1, :], first)

    def step(self) -> list[tuple[_Pending, GenerationResult]]:
        """Decode one token for every live row; returns the requests that ended."""
        if self.n + 1 > self.frame.columns:
            width = self.n - self.lo
            self._reallocate(0, self.frame.slots, width + 1 + _headroom(width))
        rows, n = len(self.rows), self.n
        self.mask[:rows, n] = 1
        self._frame(0, rows, self.lo, n)
        out = self.model(input_ids=self.next_ids[:rows, None], attention_mask=self.mask[:rows, self.lo : n + 1],
                         position_ids=self.next_pos[:rows, None], past_key_values=self.cache, use_cache=True)
        self.n = n + 1
        self.next_pos[:rows] += 1
        return self._advance(out.logits[:, -1, :], 0)

    def _advance(self, logits: Any, first: int) -> list[tuple[_Pending, GenerationResult]]:
        """Sample the next token of rows[first:] from their logits, record it, and let ended rows leave."""
        rows = self.rows[first:]
        logits = logits.float()
        tokens = _sample(logits, [row.request.sampling for row in rows], [row.generator for row in rows])
        raw = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        self.next_ids[first : first + len(rows)] = tokens
        ended = [
            first + i
            for i, (row, token, logprob) in enumerate(zip(rows, tokens.tolist(), raw.tolist()))
            if row.record(token, logprob, self.eos_token_id) or row.request.cancelled.is_set()
        ]
        done = [
            (row.request, GenerationResult(row.output_ids, row.logprobs, row.finish or "length"))
            for row in (self.rows[i] for i in ended)
            if not row.request.cancelled.is_set()
        ]
        self._remove(ended)
        return done

    def _remove(self, ended: list[int]) -> None:
        """Drop the rows in slots `ended`: the last live rows move into the holes below the new row count."""
        if not ended:
            return
        keep = len(self.rows) - len(ended)
        gone = set(ended)
        holes = [i for i in ended if i < keep]
        movers = [i for i in range(keep, len(self.rows)) if i not in gone]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            lo, n = self.lo, self.n
            for layer in self.cache.layers:
                for buf in (layer.k_buf, layer.v_buf):
                    buf[dst, :, lo:n] = buf[src, :, lo:n]
            self.mask[dst, lo:n] = self.mask[src, lo:n]  # columns outside the window are rewritten before use
            self.next_ids[dst] = self.next_ids[src]
            self.next_pos[dst] = self.next_pos[src]
            for s, d in zip(movers, holes):
                self.rows[d] = self.rows[s]
        del self.rows[keep:]
        if self.rows:
            self.lo = min(row.start for row in self.rows)
        else:
            self.lo = self.n = 0

    def _make_room(self, k: int, width: int) -> None:
        """Room for k more rows whose (left-padded) prompts of `width` tokens end at column n."""
        rows, f = len(self.rows), self.frame
        if not rows and k <= f.slots and width + 1 <= f.columns:
            self.lo = self.n = width  # nothing to keep
            return
        if rows + k <= f.slots and width <= self.n and self.n + 1 <= f.columns:
            return
        window = self.n - self.lo
        start = max(0, width - window)  # the window moves so that it ends at or after column `width`
        slots = min(self.max_rows, max(rows + k, 2 * f.slots))
        self._reallocate(start, slots, start + window + 1 + _headroom(start + window))

    def _reallocate(self, start: int, slots: int, columns: int) -> None:
        """New buffers of `slots` x `columns`, holding the live rows' window [lo, n) from column `start` on."""
        rows, lo, n = len(self.rows), self.lo, self.n
        window = n - lo

        def moved(buf: Any, column_dim: int) -> Any:
            shape = list(buf.shape)
            shape[0], shape[column_dim] = slots, columns
            new = buf.new_zeros(shape)
            new.narrow(column_dim, start, window)[:rows] = buf.narrow(column_dim, lo, window)[:rows]
            return new

        for layer in self.cache.layers:
            if layer.k_buf is not None:
                layer.k_buf, layer.v_buf = moved(layer.k_buf, 2), moved(layer.v_buf, 2)
        if self.mask is None:
            self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
            self.next_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.mask = moved(self.mask, 1)
        for name in ("next_ids", "next_pos"):
            old = getattr(self, name)
            new = old.new_zeros(slots)
            new[:rows] = old[:rows]
            setattr(self, name, new)
        for row in self.rows:
            row.start += start - lo
        self.lo, self.n = start, start + window
        self.frame.slots, self.frame.columns = slots, columns

    def _frame(self, r0: int, r1: int, c0: int, c1: int) -> None:
        self.frame.r0, self.frame.r1, self.frame.c0, self.frame.c1 = r0, r1, c0, c1


def _generator(seed: int | None, device: Any) -> Any:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _sample(logits: Any, samplings: list[SamplingConfig], generators: list[Any]) -> Any:
    """One token per row: argmax for greedy rows, else a draw from the row's temperature / top-k / top-p
    distribution. Rows with the same settings are drawn together (a GRPO rollout's rows all are: per-row
    calls cost more than the tiny model's forward); a seeded row's draw uses its own generator only, so its
    token does not depend on what it was batched with. No host sync: the caller reads all tokens at once."""
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, s in enumerate(samplings):
        groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
    if len(groups) == 1:
        ((temperature, top_k, top_p),) = groups
        return _draw(logits, temperature, top_k, top_p, generators)
    tokens = torch.empty(len(samplings), dtype=torch.long, device=logits.device)
    for (temperature, top_k, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw(logits.index_select(0, index), temperature, top_k, top_p, [generators[i] for i in rows])
    return tokens


def _draw(logits: Any, temperature: float, top_k: int, top_p: float, generators: list[Any]) -> Any:
    """One token per row under one setting, by inverse CDF with a uniform u per row (on a CPU, several times
    faster than torch.multinomial): the first token whose cumulative mass reaches (1 - u) x the row's total.
    As u is in [0, 1), that point is in (0, total], so a token of zero mass (filtered out) is never drawn."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = _filtered_probs(logits, temperature, top_k, top_p)
    uniforms = torch.rand(len(probs), dtype=torch.float64, device=probs.device)
    for i, generator in enumerate(generators):
        if generator is not None:
            uniforms[i] = torch.rand((), dtype=torch.float64, device=probs.device, generator=generator)
    cdf = probs.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, ((1 - uniforms) * cdf[:, -1]).unsqueeze(1)).squeeze(1)


def _filtered_probs(logits: Any, temperature: float, top_k: int, top_p: float) -> Any:
    """[rows, vocab] sampling probabilities at `temperature`, restricted to the top_k tokens (0: all) and to
    the smallest prefix whose mass reaches top_p (the most likely token always stays). Not renormalised after
    the top_p cut: the draw scales by each row's total."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs
