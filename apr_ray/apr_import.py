"""Import of the APR reference's demonstrations (a JSON list or JSON lines of solver traces) as a demos
dataset: streamed, every trace checked, every rejected record kept with its reason beside the output.
Pure (pyarrow, no Ray)."""

from __future__ import annotations

import codecs
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow.parquet as pq

from apr_ray.countdown.demos import Demo, DemoError, demo_from_trace_dict, flatten_apr, flatten_sosp
from apr_ray.countdown.problems import Problem
from apr_ray.data import (
    DemoFormat,
    DemosSummary,
    TextEncoder,
    check_demo_text,
    demos_schema,
    demos_table,
    prepare_output,
    summarize_demos,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MAX_REJECTED_EXAMPLES = 20  # rejected records named in the summary; all of them go to the .rejected.jsonl


class ImportFormatError(ValueError):
    """The input file cannot be read as a JSON list / JSON lines; the message says where."""


@dataclass(frozen=True)
class _BadRecord:
    reason: str


class _Rejected(Exception):
    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category
        self.reason = reason


_WHITESPACE = " \t\r\n"


def iter_json_records(
    path: str | Path,
    *,
    chunk_bytes: int = 1 << 22,
    max_record_chars: int = 1 << 26,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """(index, record) for each element of a JSON list file, or each line of a `.jsonl` file, without
    loading the file. A malformed JSON line yields a `_BadRecord` (the file goes on); a malformed
    element of a JSON list raises ImportFormatError (a list cannot be re-synchronised)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _iter_json_lines(path, on_bytes)
        return
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        buf, pos, eof, consumed = "", 0, False, 0

        def fill() -> None:
            nonlocal buf, pos, eof, consumed
            data = f.read(chunk_bytes)
            if on_bytes is not None:
                on_bytes(len(data))
            eof = not data
            consumed += pos
            buf = buf[pos:] + utf8.decode(data, final=eof)
            pos = 0

        def skip_space() -> bool:
            """Advance to the next non-space character; False at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    pos += 1
                if pos < len(buf):
                    return True
                if eof:
                    return False
                fill()

        if not skip_space() or buf[pos] != "[":
            raise ImportFormatError(f"{path}: expected a JSON list (or a .jsonl file), found {buf[pos:pos + 20]!r}")
        pos += 1
        index = 0
        if skip_space() and buf[pos] == "]":
            return
        while True:
            if not skip_space():
                raise ImportFormatError(f"{path}: file ends inside the list after record {index - 1}")
            try:
                record, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a record ending at the buffer's edge may go on
            except json.JSONDecodeError as err:
                if eof or len(buf) - pos > max_record_chars:
                    raise ImportFormatError(
                        f"{path}: record {index} (character {consumed + pos}) is not valid JSON: {err.msg} "
                        f"at character {consumed + err.pos}") from None
                complete = False
            if not complete:
                fill()
                continue
            yield index, record
            index += 1
            pos = end
            if not skip_space():
                raise ImportFormatError(f"{path}: file ends inside the list after record {index - 1}")
            if buf[pos] == ",":
                pos += 1
            elif buf[pos] == "]":
                return
            else:
                raise ImportFormatError(
                    f"{path}: expected ',' or ']' after record {index - 1} (character {consumed + pos}), "
                    f"found {buf[pos:pos + 20]!r}")


def _iter_json_lines(path: Path, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[int, Any]]:
    index = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            try:
                yield index, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield index, _BadRecord(f"line {line_no} is not valid JSON: {err}")
            index += 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def demo_from_record(record: Any, kind: str = "apr") -> Demo:
    """Validate one reference record and flatten it; raises _Rejected(category, reason).

    Categories: "json" (unparseable line), "record" (missing / mistyped keys), "trace" (breaks the
    thread protocol), "checker" (claims a goal its path does not reach), "text" (would not tokenize).
    """
    if isinstance(record, _BadRecord):
        raise _Rejected("json", record.reason)
    if not isinstance(record, dict):
        raise _Rejected("record", f"expected a JSON object, got {type(record).__name__}")
    trace_key = "trace_dict" if kind == "apr" else "search_path"
    for key in ("target", "nums", trace_key):
        if key not in record:
            raise _Rejected("record", f"missing key {key!r}")
    target, nums = record["target"], record["nums"]
    if not _is_int(target) or target < 0:
        raise _Rejected("record", f"target: expected a non-negative integer, got {target!r}"[:200])
    if not isinstance(nums, list) or not 1 <= len(nums) <= 16 or not all(_is_int(n) and n >= 0 for n in nums):
        raise _Rejected("record", f"nums: expected a list of 1..16 non-negative integers, got {nums!r}"[:200])
    problem = Problem(target, tuple(nums))
    try:
        if kind == "apr":
            demo = flatten_apr(problem, demo_from_trace_dict(record[trace_key]))
        else:
            if not isinstance(record[trace_key], str):
                raise DemoError(f"search_path: expected a string, got {type(record[trace_key]).__name__}")
            demo = flatten_sosp(problem, record[trace_key])
    except DemoError as err:
        raise _Rejected("checker" if "checker" in str(err) else "trace", str(err)) from None
    try:
        check_demo_text(demo)
    except ValueError as err:
        raise _Rejected("text", str(err)) from None
    return demo


def import_apr(
    json_path: str | Path,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    kind: Literal["apr", "sosp"] = "apr",
    fmt: DemoFormat | None = None,
    limit: int | None = None,
    rows_per_file: int = 200_000,
    demos_per_row_group: int = 512,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = 1 << 22,
) -> DemosSummary:
    """Import the reference's demonstrations (a JSON list, or JSON lines, of records with `target`,
    `nums` and `trace_dict` (APR) or `search_path` (SoS+)) as a demos dataset.

    Every trace is checked (thread protocol, strict checker, tokenizer round trip). Rejected records are
    written with their index and reason to `<out_dir>.rejected.jsonl`, beside the dataset, so nothing is
    lost. The file is streamed: memory stays at one chunk plus one row group.
    """
    from tqdm import tqdm

    fmt = fmt or DemoFormat()
    encoder = TextEncoder.from_tokenizer(tokenizer)
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no file at {json_path}")
    start = time.perf_counter()
    out = prepare_output(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    records = 0
    schema = demos_schema(fmt.include_text)
    writer: pq.ParquetWriter | None = None
    file_no, rows_in_file = 0, 0
    pending: list[tuple[str, Demo]] = []
    rejections: Counter[str] = Counter()
    examples: list[str] = []

    def flush() -> None:
        nonlocal writer, file_no, rows_in_file
        if not pending:
            return
        table = demos_table(pending, encoder, fmt)
        pending.clear()
        if writer is None or rows_in_file >= rows_per_file:
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(out / f"part-{file_no:05d}.parquet", schema)
            file_no, rows_in_file = file_no + 1, 0
        writer.write_table(table)
        rows_in_file += table.num_rows

    bar = tqdm(total=json_path.stat().st_size, unit="B", unit_scale=True, desc=f"import {json_path.name}",
               disable=not progress)
    try:
        with rejected_path.open("w") as rejected_file:
            for index, record in iter_json_records(json_path, chunk_bytes=chunk_bytes, on_bytes=bar.update):
                if limit is not None and index >= limit:
                    break
                records += 1
                try:
                    demo = demo_from_record(record, kind)
                except _Rejected as rej:
                    rejections[rej.category] += 1
                    if len(examples) < MAX_REJECTED_EXAMPLES:
                        examples.append(f"record {index} ({rej.category}): {rej.reason[:300]}")
                    kept = None if isinstance(record, _BadRecord) else record
                    rejected_file.write(json.dumps({"index": index, "category": rej.category,
                                                    "reason": rej.reason, "record": kept}) + "\n")
                    continue
                pending.append((f"{json_path.stem}/{index}", demo))
                if len(pending) >= demos_per_row_group:
                    flush()
            flush()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if file_no == 0:  # keep the output a readable (empty) dataset even when every record was rejected
        pq.write_table(schema.empty_table(), out / "part-00000.parquet")
    done = summarize_demos(out, kind)
    done.records, done.rejected, done.rejections = records, sum(rejections.values()), dict(rejections)
    done.rejected_path, done.rejected_examples = str(rejected_path), examples
    done.seconds = time.perf_counter() - start
    return done
