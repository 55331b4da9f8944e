"""The thread-tree runtime: one rollout of one problem (an APR tree, or a single serial thread) on an engine.

Owns spawn/join execution, the limits and the reasons a thread ends, the records of every engine request
(`types.ThreadRecord`), the tree metrics, the final answer and its check. Must not import Ray, vLLM or
torch: engines come in through `engines.Engine`, the text format through `countdown.protocol`.

How a tree runs. The root's prompt is the protocol's `root_prompt` (with the `budget` condition). Every
request is a prompt (token ids) and a completion the engine samples until EOS or a limit. When a request
ends at EOS and its text ends in a spawn block, the runtime starts the children the block names, all at
once (`asyncio.gather`: the engine batches them with every other tree's requests), waits for all of them,
and resumes the parent with a new request whose prompt is the protocol's join text: the parent's text
before its spawn block, then the join block with each child's result. Children may spawn in turn, up to
`max_depth`. A thread that ends at EOS without a spawn block is finished; its whole text is its result.

Token ids travel end to end. Prompts are encoded once per request (BOS first when `add_bos`); the
sampled ids and their logprobs are recorded as the engine returned them. Output ids are decoded to text
only to run the protocol. The join block is part of the next request's prompt, so it is never trained.

How threads end (the record's `end_reason`, with a `detail` for every ending other than EOS / SPAWN):
- EOS / SPAWN: the request ended at EOS, without / with a well-formed spawn block;
- MALFORMED: a broken spawn block, two spawn blocks in one request, or runtime-owned text (a join block)
  written by the model: the thread ends, its parent sees "no solution";
- DEPTH: a well-formed spawn at depth >= max_depth;
- MAX_TOKENS / CONTEXT / TREE_TOKENS: the request stopped at the per-request token limit, the context
  window (prompt + output), or the tree's total-token budget. The budget is strict on the records:
  requests running side by side may together sample past it, and the tokens past it are cut from the
  record that crossed it; a request that cannot start for lack of room is recorded with no output;
- TIMEOUT: the tree's wall-clock limit cancelled the request (its partial output is lost);
- ERROR: the engine raised, or returned an inconsistent result.
A child that did not finish is reported as "no solution" in its parent's join, as are the children a
spawn names beyond `max_children` (which never run). The tree always finishes: nothing a model writes
and no engine failure escapes `run_tree`.

The final answer is the protocol's answer in the root's whole text, and only if the root finished (its
last request ended at EOS); correctness is `check_trace` on that text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from apr_ray.countdown.checker import check_trace
from apr_ray.countdown.protocol import MAX_SPAWN_LINES, ProtocolError, Spawn, ThreadProtocol
from apr_ray.rollout.engines import Engine, GenerationResult, SamplingConfig, TextCodec, encode_prompt, request_seed
from apr_ray.types import EndReason, ThreadRecord, TreeMetrics, TreeRecord, critical_path

logger = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 300  # details quote model output; keep records small

T = TypeVar("T")


class RuntimeConfig(BaseModel):
    """Limits and sampling of one rollout. Defaults: the APR reference's evaluation settings."""

    model_config = ConfigDict(extra="forbid")

    max_children: int = Field(
        16, ge=1, le=MAX_SPAWN_LINES,
        description="children run per spawn; those a spawn names beyond it are reported as no solution",
    )
    max_depth: int = Field(
        1, ge=0, le=8, description="threads at depth < max_depth may spawn (root = 0); 1 = the APR reference"
    )
    max_tokens: int = Field(4096, ge=1, description="generated tokens per request")
    context_window: int = Field(4096, ge=2, description="prompt + generated tokens per request")
    max_tree_tokens: int = Field(131072, ge=1, description="generated tokens per tree, all requests together")
    timeout_s: float = Field(600.0, gt=0.0, description="wall clock per tree; outstanding requests are cancelled")
    budget: int | None = Field(
        None, ge=0, le=100_000,
        description="conditioning prefix of the root prompt ('Sub Call Budget: N ' for APR, 'Token Budget: "
        "N ' for SoS+); conditioning only, max_children is the enforced cap; None: no prefix",
    )
    add_bos: bool = Field(True, description="start every prompt with BOS, as the training sequences do")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


@dataclass
class _Tree:
    """Mutable state of one tree while it runs."""

    target: int
    nums: list[int]
    seed: int
    t0: float
    records: list[ThreadRecord] = field(default_factory=list)
    tokens: int = 0  # generated tokens recorded so far
    next_thread_id: int = 1
    timed_out: bool = False

    def now(self) -> float:
        return time.perf_counter() - self.t0


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


class Runtime:
    """Runs thread trees on one engine. Many trees may run at once on the same instance."""

    def __init__(self, engine: Engine, tokenizer: Any, protocol: ThreadProtocol, cfg: RuntimeConfig | None = None):
        self.engine = engine
        self.codec = TextCodec(tokenizer)
        self.protocol = protocol
        self.cfg = cfg or RuntimeConfig()
        if tokenizer.eos_token_id != engine.eos_token_id:
            raise ValueError(
                f"tokenizer EOS id {tokenizer.eos_token_id} != engine EOS id {engine.eos_token_id}: "
                "the runtime and the engine must use the same tokenizer"
            )

    async def run_tree(
        self, target: int, nums: Sequence[int], *, problem_id: str = "", seed: int = 0, policy_version: int = 0
    ) -> TreeRecord:
        """One rollout. `seed` distinguishes samples of the same problem when `sampling.seed` is set."""
        tree = _Tree(int(target), [int(n) for n in nums], seed, time.perf_counter())
        final_text: str | None = None
        root_prompt = self.protocol.root_prompt(tree.target, tree.nums, self.cfg.budget)
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                final_text = await self._thread(tree, 0, -1, 0, root_prompt)
        except TimeoutError:
            tree.timed_out = True
        except Exception as err:  # a runtime defect must not take the other trees of the batch down with it
            logger.exception("thread-tree runtime failed on problem %s", problem_id or (target, list(nums)))
            segment = 1 + max((r.segment for r in tree.records if r.thread_id == 0), default=-1)
            rec = ThreadRecord(-1, 0, -1, 0, segment, [], [], [], EndReason.ERROR, tree.now(), tree.now())
            rec.detail = _clip(f"runtime error: {type(err).__name__}: {err}")
            tree.records.append(rec)
        return self._finish(tree, final_text, problem_id, policy_version)

    # --- one thread ---------------------------------------------------------------------------------

    async def _thread(self, tree: _Tree, thread_id: int, parent_id: int, depth: int, prompt_text: str) -> str | None:
        """Run a thread to its end. Its whole text if it finished (EOS, no spawn), else None."""
        segment = 0
        while True:
            rec, output = await self._request(tree, thread_id, parent_id, depth, segment, prompt_text)
            if rec.end_reason is not EndReason.EOS:
                return None
            spawn = self._parse(rec, prompt_text, output, depth)
            if rec.end_reason is not EndReason.EOS:
                return None
            if spawn is None:
                return prompt_text + output
            run = spawn.children[: self.cfg.max_children]
            child_ids = list(range(tree.next_thread_id, tree.next_thread_id + len(run)))
            tree.next_thread_id += len(run)
            rec.end_reason, rec.spawned_thread_ids = EndReason.SPAWN, child_ids
            if len(run) < len(spawn.children):
                rec.detail = (f"spawn named {len(spawn.children)} children; ran {len(run)} (max_children), "
                              f"the rest are reported as no solution")
            results = await asyncio.gather(*(
                self._thread(tree, cid, thread_id, depth + 1, child.prompt) for cid, child in zip(child_ids, run)
            ))
            texts = [*results, *([None] * (len(spawn.children) - len(run)))]
            prompt_text = self.protocol.join(spawn, depth, texts)
            segment += 1

    def _parse(self, rec: ThreadRecord, prompt_text: str, output: str, depth: int) -> Spawn | None:
        """The spawn a finished request asks for, None if none; marks the record MALFORMED or DEPTH instead
        when the request may not spawn."""
        if self.protocol.writes_runtime_text(output):
            self._end(rec, EndReason.MALFORMED, "the model wrote runtime-owned text (a join block)")
            return None
        try:
            spawn = self.protocol.find_spawn(prompt_text + output, depth, MAX_SPAWN_LINES)
            if spawn is not None:
                if len(spawn.prefix) < len(prompt_text):
                    raise ProtocolError("the spawn block starts inside the prompt")
                if self._spawns(spawn.prefix, depth):
                    raise ProtocolError("more than one spawn block in one request")
        except ProtocolError as err:
            self._end(rec, EndReason.MALFORMED, str(err))
            return None
        except Exception as err:  # untrusted text broke a parser: a defect to fix, but a malformed output here
            logger.warning("protocol %s raised %r on model output", self.protocol.name, err)
            self._end(rec, EndReason.MALFORMED, f"protocol internal error: {type(err).__name__}: {err}")
            return None
        if spawn is not None and depth >= self.cfg.max_depth:
            self._end(rec, EndReason.DEPTH, f"spawn at depth {depth}; max_depth={self.cfg.max_depth}")
            return None
        return spawn

    def _spawns(self, text: str, depth: int) -> bool:
        try:
            return self.protocol.find_spawn(text, depth, 1) is not None
        except ProtocolError:
            return True

    # --- one request --------------------------------------------------------------------------------

    async def _request(
        self, tree: _Tree, thread_id: int, parent_id: int, depth: int, segment: int, prompt_text: str
    ) -> tuple[ThreadRecord, str]:
        """Issue one engine request and record it. Returns the record and the output text (EOS excluded)."""
        cfg = self.cfg
        prompt_ids = encode_prompt(self.codec, prompt_text, cfg.add_bos)
        rec = ThreadRecord(-1, thread_id, parent_id, depth, segment, prompt_ids, [], [], EndReason.ERROR, tree.now())
        tree.records.append(rec)  # at once: a cancelled request keeps its record
        # Ties go to the first: the context window, then the tree budget, then the per-request limit.
        rooms = [
            (cfg.context_window - len(prompt_ids), EndReason.CONTEXT),
            (cfg.max_tree_tokens - tree.tokens, EndReason.TREE_TOKENS),
            (cfg.max_tokens, EndReason.MAX_TOKENS),
        ]
        max_new, limit = min(rooms, key=lambda r: r[0])
        if max_new < 1:
            self._end(rec, limit, self._limit_detail(limit, rec, tree), tree)
            return rec, ""
        sampling = cfg.sampling
        if sampling.seed is not None:
            sampling = sampling.model_copy(update={"seed": request_seed(sampling.seed, tree.seed, thread_id, segment)})
        try:
            result = await self.engine.generate(prompt_ids, max_new, sampling)
        except asyncio.CancelledError:
            self._end(rec, EndReason.TIMEOUT, f"cancelled at {tree.now():.2f}s (timeout_s={cfg.timeout_s})", tree)
            raise
        except Exception as err:
            self._end(rec, EndReason.ERROR, f"engine raised {type(err).__name__}: {err}", tree)
            return rec, ""
        bad = self._inconsistent(result, max_new)
        if bad:
            self._end(rec, EndReason.ERROR, f"engine returned an inconsistent result: {bad}", tree)
            return rec, ""
        ids, logprobs = result.output_ids, result.logprobs
        reason = EndReason.EOS if result.finish_reason == "eos" else limit
        over = tree.tokens + len(ids) - cfg.max_tree_tokens
        if over > 0:  # requests running beside this one spent the budget first
            ids, logprobs, reason = ids[: len(ids) - over], logprobs[: len(ids) - over], EndReason.TREE_TOKENS
        tree.tokens += len(ids)
        rec.output_ids, rec.logprobs = list(ids), list(logprobs)
        text_ids = rec.output_ids[:-1] if reason is EndReason.EOS else rec.output_ids
        output = self.codec.decode(text_ids)
        self._end(rec, reason, "" if reason is EndReason.EOS else self._limit_detail(reason, rec, tree), tree)
        return rec, output

    def _inconsistent(self, result: GenerationResult, max_new: int) -> str:
        n = len(result.output_ids)
        if len(result.logprobs) != n:
            return f"{len(result.logprobs)} logprobs for {n} output ids"
        if n > max_new:
            return f"{n} output ids for max_new_tokens={max_new}"
        if result.finish_reason == "eos" and (n == 0 or result.output_ids[-1] != self.engine.eos_token_id):
            return "finish_reason 'eos' but the output does not end with the EOS id"
        if result.finish_reason not in ("eos", "length"):
            return f"unknown finish_reason {result.finish_reason!r}"
        return ""

    def _limit_detail(self, reason: EndReason, rec: ThreadRecord, tree: _Tree) -> str:
        cfg, n = self.cfg, len(rec.output_ids)
        if reason is EndReason.CONTEXT:
            return f"prompt {len(rec.prompt_ids)} + output {n} tokens reached context_window={cfg.context_window}"
        if reason is EndReason.TREE_TOKENS:
            return f"the tree reached max_tree_tokens={cfg.max_tree_tokens} ({n} tokens in this request)"
        return f"{n} tokens reached max_tokens={cfg.max_tokens}"

    @staticmethod
    def _end(rec: ThreadRecord, reason: EndReason, detail: str, tree: _Tree | None = None) -> None:
        rec.end_reason, rec.detail = reason, _clip(detail)
        if tree is not None:
            rec.end_s = tree.now()

    # --- the tree's record --------------------------------------------------------------------------

    def _finish(self, tree: _Tree, final_text: str | None, problem_id: str, policy_version: int) -> TreeRecord:
        threads = sorted(tree.records, key=lambda r: (r.thread_id, r.segment))
        for i, rec in enumerate(threads):
            rec.request_id = i
        metrics = TreeMetrics(
            tokens_total=sum(len(r.output_ids) for r in threads),
            tokens_critical_path=critical_path(threads)[0],
            num_threads=len({r.thread_id for r in threads}),
            num_requests=len(threads),
            num_spawns=sum(r.end_reason is EndReason.SPAWN for r in threads),
            max_context=max((len(r.prompt_ids) + len(r.output_ids) for r in threads), default=0),
            wall_s=tree.now(),
        )
        if final_text is not None:
            verdict = check_trace(tree.target, tree.nums, final_text)
            answer, correct = self.protocol.final_answer(final_text), verdict.ok
            reason = "" if verdict.ok else verdict.reason
        else:
            answer, correct = None, False
            if tree.timed_out:
                reason = f"the tree timed out (timeout_s={self.cfg.timeout_s})"
            else:
                last = [r for r in threads if r.thread_id == 0][-1]
                reason = f"the root did not finish: its last request ended with {last.end_reason.value}"
                reason += f" ({last.detail})" if last.detail else ""
        return TreeRecord(
            target=tree.target, nums=tree.nums, threads=threads, metrics=metrics, final_answer=answer,
            correct=correct, check_reason=reason, policy_version=policy_version, problem_id=problem_id,
        )


async def bounded_gather(aws: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """`asyncio.gather` with at most `limit` awaitables running at once; results in input order."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    gate = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with gate:
            return await aw

    return await asyncio.gather(*(one(aw) for aw in aws))
