"""Datasets on disk: Countdown problems and solver demonstrations as Parquet, the Ray Data pipelines
that write them and the streaming readers that feed the learner (the import of the APR reference's
demonstrations is `apr_ray.apr_import`).

Owns the two Parquet schemas (`PROBLEMS_SCHEMA`, `DEMOS_SCHEMA`; docs/data.md), and turns the pure
Countdown domain (problems, solvers, demo flattening) into rows. Pure functions (planning, row
building, summaries, readers) need only pyarrow, so the learner reads demonstrations on a
machine without Ray; Ray is imported inside the functions that run a Ray Data pipeline. The `_local`
writers (`generate_problem_data_local`, `generate_demos_local`) run the same per-batch functions in a
process pool instead, for a machine without Ray. Must not import torch, vLLM, the runtime or the learner.

Determinism: a problem's numbers come from a random stream per (seed, target), its demonstration from
a stream per (seed, kind, problem id), so the content of every dataset depends on its seed only, not on
the number of workers, batch sizes or scheduling (row order within files may differ).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from apr_ray.countdown.demos import Demo, flatten_apr, flatten_sosp
from apr_ray.countdown.problems import SPLITS, Problem, ProblemConfig, ProblemSpaceExhausted, is_solvable
from apr_ray.countdown.protocol import get_protocol
from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp
from apr_ray.types import TrainSequence

if TYPE_CHECKING:
    from ray.data import Dataset, DataIterator
    from transformers import PreTrainedTokenizerFast

# --- schemas -------------------------------------------------------------------------------------

PROBLEMS_SCHEMA = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),  # Problem.problem_id: "target:sorted,nums"
        pa.field("split", pa.string(), nullable=False),  # train / val / test
        pa.field("index", pa.int64(), nullable=False),  # position within its split: the canonical order
        pa.field("target", pa.int32(), nullable=False),
        pa.field("nums", pa.list_(pa.int32()), nullable=False),  # in drawn order (the prompt's order)
    ]
)

DEMOS_SCHEMA = pa.schema(
    [
        pa.field("demo_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "apr" or "sosp"
        pa.field("target", pa.int32(), nullable=False),
        pa.field("nums", pa.list_(pa.int32()), nullable=False),
        pa.field("thread_id", pa.int32(), nullable=False),  # 0 = root
        pa.field("parent_thread_id", pa.int32(), nullable=False),  # -1 for the root
        pa.field("depth", pa.int32(), nullable=False),
        pa.field("segment", pa.int32(), nullable=False),  # k = the thread's request after its k-th join
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # BOS + prompt (never trained)
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),  # trained; no EOS (iter_sft_batches appends it)
        pa.field("solved", pa.bool_(), nullable=False),  # the demo's root reached a checked goal
        pa.field("demo_requests", pa.int32(), nullable=False),  # rows of this demo
        pa.field("demo_spawns", pa.int32(), nullable=False),
        pa.field("children_per_spawn", pa.float32(), nullable=False),  # 0 when it never spawned
    ]
)

# Optional columns (DemoFormat.include_text): the texts behind the ids, for inspection.
DEMO_TEXT_FIELDS = [
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
]

SFT_COLUMNS = ["prompt_ids", "completion_ids"]
EOS_ID = 2  # the project tokenizer's `</s>` (apr_ray/tokenizer.py); pass another for other tokenizers


def demos_schema(include_text: bool = False) -> pa.Schema:
    schema = DEMOS_SCHEMA
    for f in DEMO_TEXT_FIELDS if include_text else []:
        schema = schema.append(f)
    return schema


# --- configs -------------------------------------------------------------------------------------


class DemoFormat(BaseModel):
    """How a demonstration becomes token rows; shared by generated and imported demonstrations."""

    model_config = ConfigDict(extra="forbid")

    condition: bool = Field(
        False,
        description="prefix the root's prompts with the demo's own budget: APR `Sub Call Budget: N ` "
        "(N = children per spawn, rounded), SoS+ `Token Budget: B ` (completion tokens rounded up to a bin)",
    )
    token_budget_bin: int = Field(512, ge=1, le=1 << 20, description="SoS+ token-budget bin width")
    add_bos: bool = Field(True, description="start every prompt_ids with the BOS id, as the runtime's requests do")
    include_text: bool = Field(False, description="also store the prompt / completion text columns")


class DemosConfig(BaseModel):
    """Solver demonstrations for a problems dataset."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["apr", "sosp"] = Field("apr", description="parallel (APR) or serial (SoS+) demonstrations")
    seed: int = Field(0, description="demonstrations are a function of (seed, kind, problem)")
    solver: SolverConfig = Field(default_factory=SolverConfig)
    format: DemoFormat = Field(default_factory=DemoFormat)
    only_solved: bool = Field(False, description="drop demonstrations whose search found no solution")
    batch_problems: int = Field(
        128, ge=1, le=65_536,
        description="problems per task (Ray Data or local process) and output file (~1k rows for APR)")


# --- summaries -----------------------------------------------------------------------------------


@dataclass
class ProblemsSummary:
    path: str
    counts: dict[str, int]
    seconds: float

    def report(self) -> str:
        total = sum(self.counts.values())
        splits = ", ".join(f"{s} {n:,}" for s, n in self.counts.items())
        return (f"problems: {total:,} ({splits}) in {self.seconds:.1f} s "
                f"({total / max(self.seconds, 1e-9):,.0f}/s) -> {self.path}")


@dataclass
class DemosSummary:
    path: str
    kind: str
    demos: int = 0
    sequences: int = 0  # rows: thread requests
    threads: int = 0  # logical threads (rows with segment 0)
    solved: int = 0
    spawns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_sequence_tokens: int = 0  # longest prompt + completion (+1 for EOS not counted)
    seconds: float = 0.0
    records: int = 0  # records read (import only)
    rejected: int = 0
    rejections: dict[str, int] = field(default_factory=dict)  # category -> count
    rejected_path: str | None = None
    rejected_examples: list[str] = field(default_factory=list)  # "record <index> (<category>): <reason>", first few

    @property
    def solved_share(self) -> float:
        return self.solved / self.demos if self.demos else 0.0

    def per_demo(self, value: int) -> float:
        return value / self.demos if self.demos else 0.0

    def report(self) -> str:
        lines = [
            f"{self.kind} demonstrations: {self.demos:,} ({self.sequences:,} sequences) in {self.seconds:.1f} s "
            f"({self.per_second:,.1f} demos/s) -> {self.path}",
            f"  solved {self.solved_share:.1%}; threads/demo {self.per_demo(self.threads):.2f}; "
            f"spawns/demo {self.per_demo(self.spawns):.2f}",
            f"  tokens: prompt {self.prompt_tokens:,} ({self.per_demo(self.prompt_tokens):,.0f}/demo), "
            f"completion {self.completion_tokens:,} ({self.per_demo(self.completion_tokens):,.0f}/demo), "
            f"longest sequence {self.max_sequence_tokens:,}",
        ]
        if self.records:
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejections.items())) or "none"
            lines.append(f"  records read {self.records:,}; rejected {self.rejected:,} ({reasons})"
                         + (f" -> {self.rejected_path}" if self.rejected else ""))
            lines += [f"    {example}" for example in self.rejected_examples]
            if self.rejected > len(self.rejected_examples):
                lines.append(f"    ... {self.rejected - len(self.rejected_examples):,} more in {self.rejected_path}")
        return "\n".join(lines)

    @property
    def per_second(self) -> float:
        return self.demos / self.seconds if self.seconds > 0 else 0.0


# --- problems: planning and generation (pure) ------------------------------------------------------


def _check_sizes(sizes: dict[str, int]) -> None:
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected some of {SPLITS}")
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"split {name!r}: size {n} is negative")


def plan_problems(cfg: ProblemConfig, sizes: dict[str, int], seed: int) -> list[dict[str, Any]]:
    """One row per target: which positions of each split hold a problem with that target.

    Each split draws its targets position by position, uniformly, as the reference draws a target per
    problem; a split has its own stream, so the evaluation splits do not depend on the train size.
    """
    import numpy as np

    _check_sizes(sizes)
    rows: dict[int, dict[str, Any]] = {}
    for split_no, split in enumerate(SPLITS):
        n = sizes.get(split, 0)
        if n == 0:
            continue
        targets = np.random.default_rng([seed, split_no]).integers(cfg.target_min, cfg.target_max + 1, size=n)
        order = np.argsort(targets, kind="stable")
        bounds = np.flatnonzero(np.diff(targets[order])) + 1
        for group in np.split(order, bounds):
            target = int(targets[group[0]])
            row = rows.setdefault(target, {"target": target, **{s: [] for s in SPLITS}})
            row[split] = group.tolist()
    return [rows[t] for t in sorted(rows)]


def problems_for_target(
    cfg: ProblemConfig, target: int, positions: dict[str, Sequence[int]], seed: int, max_redraws: int = 10_000
) -> list[tuple[str, int, Problem]]:
    """The problems of one target: (split, index, problem), distinct, none shared between splits.

    One stream per (seed, target) draws the numbers uniformly until they reach the target (the
    reference's rejection sampling); evaluation splits take the first problems of the stream.
    """
    rng = random.Random(f"{seed}/{target}")
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[str, int, Problem]] = []
    for split in ("val", "test", "train"):
        for index in positions.get(split, ()):
            for _ in range(max_redraws):
                nums = tuple(rng.randint(cfg.num_min, cfg.num_max) for _ in range(cfg.num_operands))
                key = tuple(sorted(nums))
                if key not in seen and is_solvable(key, target):
                    seen.add(key)
                    out.append((split, int(index), Problem(target, nums)))
                    break
            else:
                raise ProblemSpaceExhausted(
                    f"target {target}: no new solvable numbers in {max_redraws} draws after {len(seen)} problems; "
                    f"widen num_min..num_max ({cfg.num_min}..{cfg.num_max}) or the target range, or ask for fewer"
                )
    return out


def problems_table(rows: Sequence[tuple[str, int, Problem]]) -> pa.Table:
    return pa.table(
        {
            "problem_id": [p.problem_id for _, _, p in rows],
            "split": [s for s, _, _ in rows],
            "index": [i for _, i, _ in rows],
            "target": [p.target for _, _, p in rows],
            "nums": [list(p.nums) for _, _, p in rows],
        },
        schema=PROBLEMS_SCHEMA,
    )


def _problems_rows(plans: Sequence[dict[str, Any]], cfg: ProblemConfig, seed: int) -> pa.Table:
    """The problems of some `plan_problems` rows, as a PROBLEMS_SCHEMA table."""
    rows: list[tuple[str, int, Problem]] = []
    for plan in plans:
        rows += problems_for_target(cfg, plan["target"], plan, seed)
    return problems_table(rows)


def _problems_batch(batch: pa.Table, cfg: ProblemConfig, seed: int) -> pa.Table:
    return _problems_rows(batch.to_pylist(), cfg, seed)


# --- demonstrations: rows (pure) --------------------------------------------------------------------

# Text that does not round-trip through the tokenizer: non-printable-ASCII characters or the literal
# special-token strings. One C-level scan; the tokenizer's own check then names the culprit.
_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e\t\n\r\x0b\x0c]|<s>|</s>|<pad>|<unk>")


def check_demo_text(demo: Demo) -> None:
    """Raise TokenizerInputError if some text of `demo` would not encode exactly."""
    from apr_ray.tokenizer import TokenizerInputError, check_text

    for seq in demo.sequences:
        for part in (seq.prompt, seq.completion):
            if _UNSAFE_TEXT.search(part):
                check_text(part)
                raise TokenizerInputError(f"text of thread {seq.thread_id} segment {seq.segment} would not round-trip")


def solve_demo(problem: Problem, config: DemosConfig) -> Demo:
    """The demonstration of one problem, from its own random stream."""
    rng = random.Random(f"{config.seed}/{config.kind}/{problem.problem_id}")
    if config.kind == "apr":
        return flatten_apr(problem, solve_apr(problem, config.solver, rng))
    trace, _ = solve_sosp(problem, config.solver, rng)
    return flatten_sosp(problem, trace)


def _budget(demo: Demo, completion_tokens: int, fmt: DemoFormat) -> int:
    if demo.kind == "apr":
        return math.floor(demo.children_per_spawn + 0.5)  # round half up; one spawn per demo is the norm
    return max(1, math.ceil(completion_tokens / fmt.token_budget_bin)) * fmt.token_budget_bin


def demos_table(items: Sequence[tuple[str, Demo]], encoder: TextEncoder, fmt: DemoFormat) -> pa.Table:
    """Rows of DEMOS_SCHEMA for (demo_id, demo) pairs; texts must pass `check_demo_text`.

    Completions are tokenized first: a SoS+ token-budget condition depends on their length.
    """
    seqs = [(demo_id, demo, seq) for demo_id, demo in items for seq in demo.sequences]
    completions = encoder([seq.completion for _, _, seq in seqs])
    budget_of: dict[str, int] = {}
    if fmt.condition:
        for (demo_id, demo, seq), ids in zip(seqs, completions):
            if seq.depth == 0:  # SoS+ has one sequence; APR's budget ignores tokens
                budget_of.setdefault(demo_id, _budget(demo, len(ids), fmt))
    prompts_text = [
        (get_protocol(demo.kind).condition(budget_of[demo_id]) if fmt.condition and seq.depth == 0 else "") + seq.prompt
        for demo_id, demo, seq in seqs
    ]
    bos = [encoder.bos_id] if fmt.add_bos else []
    prompts = [bos + ids for ids in encoder(prompts_text)]
    columns: dict[str, list] = {
        "demo_id": [d for d, _, _ in seqs],
        "problem_id": [demo.problem.problem_id for _, demo, _ in seqs],
        "kind": [demo.kind for _, demo, _ in seqs],
        "target": [demo.problem.target for _, demo, _ in seqs],
        "nums": [list(demo.problem.nums) for _, demo, _ in seqs],
        "thread_id": [s.thread_id for _, _, s in seqs],
        "parent_thread_id": [s.parent_thread_id for _, _, s in seqs],
        "depth": [s.depth for _, _, s in seqs],
        "segment": [s.segment for _, _, s in seqs],
        "prompt_ids": prompts,
        "completion_ids": completions,
        "solved": [demo.solved for _, demo, _ in seqs],
        "demo_requests": [len(demo.sequences) for _, demo, _ in seqs],
        "demo_spawns": [demo.spawns for _, demo, _ in seqs],
        "children_per_spawn": [demo.children_per_spawn for _, demo, _ in seqs],
    }
    if fmt.include_text:
        columns["prompt"] = prompts_text
        columns["completion"] = [s.completion for _, _, s in seqs]
    return pa.table(columns, schema=demos_schema(fmt.include_text))


class TextEncoder:
    """Token ids (no BOS / EOS) for many texts, equal to `tokenizer(texts, add_special_tokens=False)`.

    Built from the tokenizer's serialised form, so Ray workers need `tokenizers` but not
    `transformers` (~2 s of imports per worker). For a tokenizer of the project's kind (word-level
    vocabulary after one regex split, no normalizer) it runs that same regex and vocabulary with
    Python's `re`: several times faster than the Rust pipeline on trace text (bench/results.md), where
    tokenization otherwise costs more than solving. Any other tokenizer runs as is. Texts must hold
    no special-token strings (`check_demo_text`), which the tokenizer would match before splitting.
    """

    def __init__(self, spec: str, bos_id: int):
        self.spec, self.bos_id = spec, bos_id
        self._backend: Any = None
        self.split: re.Pattern[str] | None = None
        parsed = json.loads(spec)
        model, pre = parsed.get("model") or {}, parsed.get("pre_tokenizer") or {}
        pattern = (pre.get("pattern") or {}).get("Regex")
        if (model.get("type") == "WordLevel" and parsed.get("normalizer") is None and pre.get("type") == "Split"
                and pre.get("behavior") == "Isolated" and not pre.get("invert") and pattern is not None):
            split = re.compile(pattern)
            if split.groups == 0:  # findall returns whole matches only when the pattern captures nothing
                self.split = split
                self.vocab: dict[str, int] = model["vocab"]
                self.unk: int = self.vocab[model["unk_token"]]

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> TextEncoder:
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.bos_token_id)

    def __reduce__(self):
        return TextEncoder, (self.spec, self.bos_id)

    def _tokenizer(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.spec)
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.split is None:
            return self._tokenizer(list(texts))
        out = []
        vocab, unk = self.vocab, self.unk
        for text in texts:
            pieces = self.split.findall(text)
            if sum(map(len, pieces)) != len(text):  # text the regex does not cover: let the tokenizer decide
                out += self._tokenizer([text])
            else:
                out.append([vocab.get(piece, unk) for piece in pieces])
        return out


class DemoWorker:
    """A batch of problems (PROBLEMS_SCHEMA columns) -> the rows of their demonstrations."""

    def __init__(self, config: DemosConfig, encoder: TextEncoder):
        self.config = config
        self.encoder = encoder

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = []
        for row in batch.select(["target", "nums"]).to_pylist():
            problem = Problem(row["target"], tuple(row["nums"]))
            demo = solve_demo(problem, self.config)
            if self.config.only_solved and not demo.solved:
                continue
            check_demo_text(demo)
            items.append((f"{self.config.kind}/{problem.problem_id}", demo))
        return demos_table(items, self.encoder, self.config.format)


def _demos_block(batch: pa.Table, config: DemosConfig, encoder: TextEncoder) -> pa.Table:
    """The demonstrations of one block of problems (a one-row batch holding the block's rows)."""
    # A task, not an actor pool: the read, this map and the write fuse into one task, so `workers`
    # tasks use `workers` CPUs; an actor pool as large as the cluster starves the read tasks (deadlock).
    problems = pa.Table.from_pylist(batch["problems"][0].as_py(), schema=PROBLEMS_SCHEMA)
    return DemoWorker(config, encoder)(problems)


# --- summaries from files (pure, streaming) ------------------------------------------------------


def has_parquet(directory: str | Path) -> bool:
    """Whether a dataset directory holds any Parquet file (a stage wrote it)."""
    directory = Path(directory)
    return directory.is_dir() and any(directory.rglob("*.parquet"))


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a dataset (a directory, searched recursively, or one file), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no dataset at {path}: expected a Parquet file or a directory of them")
    files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


def summarize_demos(path: str | Path, kind: str = "") -> DemosSummary:
    """Counts and token totals of a demos dataset, read row group by row group."""
    summary = DemosSummary(path=str(path), kind=kind)
    kinds: Counter[str] = Counter()
    columns = ["kind", "thread_id", "segment", "solved", "demo_spawns", "prompt_ids", "completion_ids"]
    for file in parquet_files(path):
        reader = pq.ParquetFile(file)
        for rg in range(reader.num_row_groups):
            t = reader.read_row_group(rg, columns=columns)
            if t.num_rows == 0:
                continue
            p_len = pc.list_value_length(t["prompt_ids"])
            c_len = pc.list_value_length(t["completion_ids"])
            root = pc.and_(pc.equal(t["thread_id"], 0), pc.equal(t["segment"], 0))
            summary.sequences += t.num_rows
            summary.threads += pc.sum(pc.cast(pc.equal(t["segment"], 0), pa.int64())).as_py() or 0
            summary.demos += pc.sum(pc.cast(root, pa.int64())).as_py() or 0
            summary.solved += pc.sum(pc.cast(pc.and_(root, t["solved"]), pa.int64())).as_py() or 0
            summary.spawns += pc.sum(pc.if_else(root, t["demo_spawns"], 0)).as_py() or 0
            summary.prompt_tokens += pc.sum(p_len).as_py() or 0
            summary.completion_tokens += pc.sum(c_len).as_py() or 0
            summary.max_sequence_tokens = max(summary.max_sequence_tokens, pc.max(pc.add(p_len, c_len)).as_py() or 0)
            kinds.update(t["kind"].to_pylist())
    if not kind and kinds:
        summary.kind = "+".join(sorted(kinds))
    return summary


def count_problems(path: str | Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for file in parquet_files(path):
        counts.update(pq.read_table(file, columns=["split"])["split"].to_pylist())
    return {s: counts[s] for s in SPLITS if counts[s]}


# --- readers (pyarrow; no Ray needed) ------------------------------------------------------------


def read_problems_table(path: str | Path, split: str, limit: int | None = None) -> pa.Table:
    """One split's rows (PROBLEMS_SCHEMA), ordered by index; `limit` keeps the first `limit`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    filters = [("split", "=", split)] + ([("index", "<", limit)] if limit is not None else [])
    table = pa.concat_tables([pq.read_table(f, filters=filters, schema=PROBLEMS_SCHEMA) for f in parquet_files(path)])
    if table.num_rows == 0:
        raise ValueError(f"{path}: no problems in split {split!r}; it holds {count_problems(path) or 'none'}")
    return table.sort_by("index")


def read_problems(path: str | Path, split: str) -> list[Problem]:
    """The problems of one split, in their canonical order (the `index` column)."""
    table = read_problems_table(path, split)
    return [Problem(t, tuple(n)) for t, n in zip(table["target"].to_pylist(), table["nums"].to_pylist())]


def read_demo_rows(path: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row of a demos dataset as dicts, ordered by (demo_id, thread_id, segment). Loads it all:
    for inspection and small datasets; training streams with `iter_sft_batches`."""
    tables = [pq.read_table(f, columns=columns) for f in parquet_files(path)]
    table = pa.concat_tables(tables)
    keys = [k for k in ("demo_id", "thread_id", "segment") if k in table.column_names]
    return (table.sort_by([(k, "ascending") for k in keys]) if keys else table).to_pylist()


def _row_groups(path: str | Path) -> list[tuple[Path, int, int]]:
    out = []
    for file in parquet_files(path):
        meta = pq.ParquetFile(file).metadata
        out += [(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return out


def _to_sequences(table: pa.Table, eos_id: int) -> list[TrainSequence]:
    """The model must learn to end its requests (a spawn block or a finished thread ends in EOS, which
    is how the runtime sees it), so EOS is trained after every completion, as in the rollouts."""
    return [TrainSequence(prompt_ids=p, output_ids=c + [eos_id], weight=1.0)
            for p, c in zip(table["prompt_ids"].to_pylist(), table["completion_ids"].to_pylist())]


def _buffered_shuffle(items: Iterator[TrainSequence], size: int, rng: random.Random) -> Iterator[TrainSequence]:
    """A streaming shuffle: hold `size` items, emit a random one as each new one arrives."""
    buffer: list[TrainSequence] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


def _seeded_row_groups(path: str | Path, seed: int) -> list[tuple[Path, int, int]]:
    """The row groups in the order one epoch reads them: the Parquet reader and the Ray stream share it."""
    groups = _row_groups(path)
    random.Random(seed).shuffle(groups)
    return groups


def _rank_rows(path: str | Path, seed: int, rank: int, world_size: int, eos_id: int) -> Iterator[TrainSequence]:
    """This rank's sequences: row groups in a seeded order, and from each a contiguous 1/world_size
    slice (so any number of row groups serves any number of ranks; which rank gets which slice rotates
    from group to group, so the odd rows spread evenly). Every rank stops at the smallest rank's row
    count, so all ranks take the same number of steps (DeepSpeed needs that). Each rank decodes every
    row group: cheap next to training on it."""
    groups = _seeded_row_groups(path, seed)

    def share(k: int, n: int, r: int) -> tuple[int, int]:
        slot = (r + k) % world_size
        return n * slot // world_size, n * (slot + 1) // world_size

    quota = min(sum(hi - lo for lo, hi in (share(k, n, r) for k, (_, _, n) in enumerate(groups)))
                for r in range(world_size))
    left = quota
    for k, (file, index, n) in enumerate(groups):
        if left <= 0:
            return
        lo, hi = share(k, n, rank)
        if hi == lo:
            continue
        table = pq.ParquetFile(file).read_row_group(index, columns=SFT_COLUMNS).slice(lo, min(hi - lo, left))
        left -= table.num_rows
        yield from _to_sequences(table, eos_id)


def iter_sft_batches(
    demos: str | Path | DataIterator,
    batch_sequences: int,
    *,
    shuffle_buffer: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    eos_id: int = EOS_ID,
) -> Iterator[list[TrainSequence]]:
    """One pass over a demos dataset as batches of TrainSequence (prompt_ids, output_ids = completion
    + EOS, weight 1).

    `demos` is a dataset path (read with pyarrow, no Ray needed; each rank reads its own share) or a
    Ray Data iterator from `split_sft_stream` (the driver split the stream; rank and world_size are then
    ignored). Nothing is materialised beyond one row group and the shuffle buffer; `shuffle_buffer` <= 1
    keeps the stored order. Pass a different seed per epoch for a different order.
    """
    if batch_sequences < 1:
        raise ValueError(f"batch_sequences must be >= 1, got {batch_sequences}")
    if isinstance(demos, (str, Path)):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        rows = _rank_rows(demos, seed, rank, world_size, eos_id)
    else:
        rows = (seq for table in demos.iter_batches(batch_size=None, batch_format="pyarrow")
                for seq in _to_sequences(table, eos_id))
    # One shuffle for both sources: with the row groups in the same order, a one-rank Ray stream gives the
    # Parquet reader's batches, so the Ray job and the plain script train the same model from one config.
    if shuffle_buffer > 1:
        rows = _buffered_shuffle(rows, shuffle_buffer, random.Random(f"{seed}/{rank}"))
    batch: list[TrainSequence] = []
    for seq in rows:
        batch.append(seq)
        if len(batch) == batch_sequences:
            yield batch
            batch = []
    if batch:
        yield batch


# --- shared by the Ray Data and the local pipelines -----------------------------------------------


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def _plan_problem_data(
    sizes: dict[str, int], seed: int, problem: ProblemConfig | None, workers: int
) -> tuple[ProblemConfig, list[dict[str, Any]], int]:
    """(config, plan rows, number of blocks) for a problems dataset; raises on bad arguments."""
    _check_workers(workers)
    cfg = problem or ProblemConfig()
    plan = plan_problems(cfg, sizes, seed)
    if not plan:
        raise ValueError(f"no problems requested: sizes {sizes}")
    # A few blocks per worker keeps them busy when targets differ in cost.
    return cfg, plan, min(len(plan), 4 * workers)


def _demo_encoder(tokenizer: PreTrainedTokenizerFast | None) -> TextEncoder:
    if tokenizer is None:
        from apr_ray.tokenizer import build_tokenizer

        tokenizer = build_tokenizer()
    return TextEncoder.from_tokenizer(tokenizer)


def _problem_blocks(table: pa.Table, block_rows: int, copy: bool = False) -> list[pa.Table]:
    """`table` in blocks of `block_rows` rows. `copy` gives each block its own buffers: a pickled
    slice carries the whole table's buffers (pyarrow), so blocks sent to other processes are copies."""
    starts = range(0, table.num_rows, block_rows)
    if copy:
        return [table.take(pa.array(range(i, min(i + block_rows, table.num_rows)))) for i in starts]
    return [table.slice(i, block_rows) for i in starts]


# --- Ray Data pipelines -------------------------------------------------------------------------


def prepare_output(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; choose another or pass overwrite=True")
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _progress(enabled: bool) -> None:
    """Ray Data's bars on a terminal only: without one it logs a progress dump every few seconds instead."""
    import sys

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = enabled and sys.stdout.isatty()


def generate_problem_data(
    out_dir: str | Path,
    sizes: dict[str, int],
    *,
    seed: int,
    problem: ProblemConfig | None = None,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> ProblemsSummary:
    """Write disjoint, de-duplicated problem splits as Parquet with Ray Data (one task per group of
    targets; `workers` tasks at a time). The content depends on (problem config, sizes, seed) only."""
    import ray.data

    start = time.perf_counter()
    cfg, plan, blocks = _plan_problem_data(sizes, seed, problem, workers)
    out = prepare_output(out_dir, overwrite)
    _progress(progress)
    ds = ray.data.from_items(plan, override_num_blocks=blocks)
    ds = ds.map_batches(_problems_batch, fn_kwargs={"cfg": cfg, "seed": seed}, batch_size=None,
                        batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1)
    ds.write_parquet(str(out))
    return ProblemsSummary(str(out), count_problems(out), time.perf_counter() - start)


def problems_dataset(path: str | Path, split: str, limit: int | None = None, block_rows: int = 1024) -> Dataset:
    """A Ray dataset of one split's problems in index order, `block_rows` per block.

    Read on the driver (a problem is ~40 bytes: 500k fit in ~20 MB) and handed over as rows: `from_items`
    builds its blocks here, where `from_arrow` computes their metadata in tasks that wait for a CPU, and
    the learner and the generators reading this stream may hold every CPU of the cluster.
    """
    import ray.data

    table = read_problems_table(path, split, limit)
    return ray.data.from_items(table.to_pylist(), override_num_blocks=max(1, math.ceil(table.num_rows / block_rows)))


def generate_demos(
    problems_path: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    config: DemosConfig | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    limit: int | None = None,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> DemosSummary:
    """Solve a problems split with Ray Data (`workers` tasks at a time) and write one row per thread
    request as Parquet. The content depends on (problems, config) only, and so does the layout: row group k
    holds the demonstrations of problems [k * batch_problems, (k + 1) * batch_problems), as
    `generate_demos_local` writes them. SFT reads row groups in a seeded order, so the same layout gives the
    same batches whichever writer made the data."""
    import ray.data

    _check_workers(workers)
    cfg = config or DemosConfig()
    start = time.perf_counter()
    table = read_problems_table(problems_path, split, limit)
    out = prepare_output(out_dir, overwrite)
    _progress(progress)
    encoder = _demo_encoder(tokenizer)
    # One item per block of problems, one Ray block per item: Ray Data would otherwise cut the rows into
    # blocks of its own sizes, and the row groups (the unit of the SFT order) with them.
    blocks = [{"problems": block.to_pylist()} for block in _problem_blocks(table, cfg.batch_problems)]
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    ds = ds.map_batches(_demos_block, fn_kwargs={"config": cfg, "encoder": encoder}, batch_size=1,
                        batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1)
    ds.write_parquet(str(out))
    summary = summarize_demos(out, cfg.kind)
    summary.seconds = time.perf_counter() - start
    return summary


def split_sft_stream(demos_path: str | Path, world_size: int, *, seed: int) -> list[DataIterator]:
    """Driver side: one Ray Data iterator per learner rank over the demos (equal shares, row groups in a
    seeded order); hand iterator i to rank i and read it with `iter_sft_batches`."""
    import ray.data

    row_groups = [{"file": str(f), "row_group": g} for f, g, _ in _seeded_row_groups(demos_path, seed)]
    # Every task here asks for no CPU: the learners (and generators, and other jobs' actors) may hold all
    # the cluster's CPUs while they read this stream, and `read_parquet` lists and samples files in tasks
    # that wait for a CPU, so the SFT stage would hang.
    ds = ray.data.from_items(row_groups, override_num_blocks=len(row_groups))
    ds = ds.map_batches(_read_row_groups, batch_size=None, batch_format="pyarrow", num_cpus=0)
    # Blocks otherwise leave in the order their reads finish: the same seed would not give the same batches.
    ds.context.execution_options.preserve_order = True
    return ds.streaming_split(world_size, equal=True)


def iter_sft_stream_epoch(
    demos_path: str | Path, batch_sequences: int, *, shuffle_buffer: int, seed: int
) -> Iterator[list[TrainSequence]]:
    """One pass over the demos through Ray Data for a single learner rank: the batches the Parquet reader
    (`iter_sft_batches(demos_path, ...)`) gives for the same seed, in the same order. Call it with a new seed
    per epoch: a stream split once and read again keeps its row-group order, so every epoch would open and
    close on the same problems."""
    (stream,) = split_sft_stream(demos_path, 1, seed=seed)
    yield from iter_sft_batches(stream, batch_sequences, shuffle_buffer=shuffle_buffer, seed=seed)


def _read_row_groups(batch: pa.Table) -> pa.Table:
    return pa.concat_tables(pq.ParquetFile(f).read_row_group(g, columns=SFT_COLUMNS)
                            for f, g in zip(batch["file"].to_pylist(), batch["row_group"].to_pylist()))


# --- local pipelines (no Ray): the same batch functions in a process pool ------------------------


def _problems_part(path: Path, plans: list[dict[str, Any]], cfg: ProblemConfig, seed: int) -> int:
    table = _problems_rows(plans, cfg, seed)
    pq.write_table(table, path)
    return table.num_rows


def _demos_part(path: Path, batch: pa.Table, config: DemosConfig, encoder: TextEncoder) -> int:
    pq.write_table(DemoWorker(config, encoder)(batch), path)
    return batch.num_rows  # problems done: the progress bar's unit


def _init_local_worker() -> None:
    # One process per core already: the tokenizers library's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_parts(
    parts: list[tuple[Callable[..., int], tuple[Any, ...]]], workers: int, on_done: Callable[[int], Any]
) -> None:
    """Run `fn(*args)` for each part, in this process (workers == 1) or in `workers` spawned ones.

    Each part writes its own file and returns a count, so only small inputs and ints cross processes.
    Spawn, not fork: a forked copy of a process holding threads (tokenizers, torch) can deadlock."""
    if workers == 1 or len(parts) <= 1:
        for fn, args in parts:
            on_done(fn(*args))
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(parts)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_local_worker) as pool:
        futures = [pool.submit(fn, *args) for fn, args in parts]
        try:
            for future in as_completed(futures):
                on_done(future.result())
        except BaseException:
            for future in futures:  # stop at the first failure rather than after every queued part
                future.cancel()
            raise


def _part_path(out: Path, number: int) -> Path:
    return out / f"part-{number:05d}.parquet"


def generate_problem_data_local(
    out_dir: str | Path,
    sizes: dict[str, int],
    *,
    seed: int,
    problem: ProblemConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> ProblemsSummary:
    """`generate_problem_data` without Ray: the same rows, one Parquet file per group of targets,
    written by `workers` processes (in this process when 1). With workers > 1, call it from a script
    whose top level is guarded by `if __name__ == "__main__":` (spawned workers import the main module)."""
    start = time.perf_counter()
    cfg, plan, blocks = _plan_problem_data(sizes, seed, problem, workers)
    out = prepare_output(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    bounds = [len(plan) * k // blocks for k in range(blocks + 1)]
    parts = [(_problems_part, (_part_path(out, k), plan[bounds[k]:bounds[k + 1]], cfg, seed)) for k in range(blocks)]
    _run_parts(parts, workers, lambda _: None)
    return ProblemsSummary(str(out), count_problems(out), time.perf_counter() - start)


def generate_demos_local(
    problems_path: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    config: DemosConfig | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    limit: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> DemosSummary:
    """`generate_demos` without Ray: the same rows, one Parquet file per `config.batch_problems`
    problems, written by `workers` processes (in this process when 1); `progress` shows a tqdm bar of
    problems solved. With workers > 1, guard the calling script's top level with
    `if __name__ == "__main__":` (spawned workers import the main module)."""
    _check_workers(workers)
    cfg = config or DemosConfig()
    start = time.perf_counter()
    table = read_problems_table(problems_path, split, limit)
    out = prepare_output(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    encoder = _demo_encoder(tokenizer)
    blocks = _problem_blocks(table, cfg.batch_problems, copy=workers > 1)
    parts = [(_demos_part, (_part_path(out, k), block, cfg, encoder)) for k, block in enumerate(blocks)]
    from tqdm import tqdm

    with tqdm(total=table.num_rows, unit="problem", desc=f"{cfg.kind} demos", disable=not progress) as bar:
        _run_parts(parts, workers, bar.update)
    summary = summarize_demos(out, cfg.kind)
    summary.seconds = time.perf_counter() - start
    return summary
