"""Import of the APR reference's demonstrations: the streaming JSON reader, record validation (good
records kept, bad ones reported by index and kept in the .rejected.jsonl), and what the rows hold.

The fixture tests/fixtures/apr_reference_sample.json is in the reference layout (a JSON list written
with indent=2, records with target / nums / trace_dict and the reference's other keys). Records 0-2
come from our APR solver (one spawn and solved; no spawn; spawned and unsolved); records 3-7 are
corrupted on purpose: a spawn line naming a node never generated, a sub call missing, a wrong final
operation, no trace_dict, nums as a string.
"""

import json
import pickle
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apr_ray.countdown import text as T
from apr_ray.countdown.problems import Problem, ProblemConfig, generate_problems
from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp
from apr_ray.data import (
    DEMOS_SCHEMA,
    EOS_ID,
    DemoFormat,
    TextEncoder,
    demos_schema,
    iter_sft_batches,
    read_demo_rows,
    summarize_demos,
)
from apr_ray.apr_import import ImportFormatError, import_apr, iter_json_records
from apr_ray.tokenizer import build_tokenizer

FIXTURE = Path(__file__).parent.parent / "fixtures" / "apr_reference_sample.json"
GOOD = [0, 1, 2]
BAD = {3: "trace", 4: "trace", 5: "checker", 6: "record", 7: "record"}
REASONS = {3: "never generated", 4: "1 sub calls for 2 spawned nodes", 5: "wrong arithmetic", 6: "'trace_dict'",
           7: "nums"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def rows(path: Path) -> list[dict]:
    return read_demo_rows(path)


def rejected(out: Path) -> dict[int, dict]:
    lines = out.with_name(out.name + ".rejected.jsonl").read_text().splitlines()
    return {r["index"]: r for r in map(json.loads, lines)}


def test_fixture_keeps_good_records_and_reports_bad_ones_by_index(tmp_path, tokenizer):
    out = tmp_path / "demos"
    summary = import_apr(FIXTURE, out, tokenizer, progress=False)
    assert summary.records == 8
    assert summary.demos == len(GOOD) and summary.rejected == len(BAD)
    assert summary.rejections == {"trace": 2, "checker": 1, "record": 2}
    kept = rows(out)
    assert sorted({r["demo_id"] for r in kept}) == [f"apr_reference_sample/{i}" for i in GOOD]
    bad = rejected(out)
    assert sorted(bad) == sorted(BAD)
    source = json.loads(FIXTURE.read_text())
    for index, category in BAD.items():
        assert bad[index]["category"] == category
        assert REASONS[index] in bad[index]["reason"]
        assert bad[index]["record"] == source[index]  # nothing is lost
        assert any(line.startswith(f"record {index} ({category})") for line in summary.rejected_examples)
    assert "rejected 5" in summary.report() and "record 3 (trace)" in summary.report()


def test_rows_rebuild_every_thread_of_the_reference_trace(tmp_path, tokenizer):
    out = tmp_path / "demos"
    import_apr(FIXTURE, out, tokenizer, progress=False)
    source = json.loads(FIXTURE.read_text())
    by_demo: dict[str, list[dict]] = {}
    for r in rows(out):
        by_demo.setdefault(r["demo_id"], []).append(r)
    for index in GOOD:
        record, threads = source[index], by_demo[f"apr_reference_sample/{index}"]
        assert all(r["prompt_ids"][0] == tokenizer.bos_token_id for r in threads)
        assert all(tokenizer.eos_token_id not in r["completion_ids"] for r in threads)
        text = {(r["thread_id"], r["segment"]): tokenizer.decode(r["prompt_ids"][1:] + r["completion_ids"])
                for r in threads}
        # the root's last request holds the reference's last main call (its search_path) exactly
        last = max(s for t, s in text if t == 0)
        assert text[(0, last)] == record["trace_dict"]["main_calls"][-1] == record["search_path"]
        # every child's single request is its own trace
        children = [c for group in record["trace_dict"]["sub_calls"] for c in group]
        assert sorted(text[(t, 0)] for t, _ in text if t != 0) == sorted(c["main_calls"][0] for c in children)
        n = 1 + len(children) + len(record["trace_dict"]["main_calls"]) - 1
        assert len(threads) == n and {r["demo_requests"] for r in threads} == {n}
        assert {r["solved"] for r in threads} == {T.answer_path(record["search_path"]) is not None}
        assert {r["target"] for r in threads} == {record["target"]} and threads[0]["nums"] == record["nums"]
    assert pq.read_schema(next(out.glob("*.parquet"))).equals(DEMOS_SCHEMA)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000])
def test_chunk_size_does_not_change_the_result(tmp_path, tokenizer, chunk_bytes):
    import_apr(FIXTURE, tmp_path / "big", tokenizer, progress=False)
    import_apr(FIXTURE, tmp_path / "small", tokenizer, progress=False, chunk_bytes=chunk_bytes)
    assert rows(tmp_path / "small") == rows(tmp_path / "big")
    assert rejected(tmp_path / "small") == rejected(tmp_path / "big")


def test_jsonl_is_accepted_and_a_malformed_line_is_one_rejection(tmp_path, tokenizer):
    source = json.loads(FIXTURE.read_text())
    lines = [json.dumps(r) for r in source[:3]] + ["", '{"target": 5, "nums": [1, 2', json.dumps(source[3])]
    path = tmp_path / "sample.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "demos"
    summary = import_apr(path, out, tokenizer, progress=False)
    assert summary.records == 5 and summary.demos == 3  # the blank line is not a record
    bad = rejected(out)
    assert bad[3]["category"] == "json" and "line 5" in bad[3]["reason"] and bad[3]["record"] is None
    assert bad[4]["category"] == "trace"
    assert sorted({r["demo_id"] for r in rows(out)}) == [f"sample/{i}" for i in GOOD]


def test_text_that_would_not_round_trip_is_rejected(tmp_path, tokenizer):
    source = json.loads(FIXTURE.read_text())
    record = source[1]
    record["trace_dict"]["main_calls"][-1] += "done \u2713\n"  # after the answer: the trace itself stays valid
    path = tmp_path / "one.json"
    path.write_text(json.dumps([source[0], record]))
    summary = import_apr(path, tmp_path / "demos", tokenizer, progress=False)
    assert summary.demos == 1 and summary.rejections == {"text": 1}
    assert "U+2713" in rejected(tmp_path / "demos")[1]["reason"]


def test_thread_count_condition_goes_on_root_prompts_only(tmp_path, tokenizer):
    out = tmp_path / "demos"
    import_apr(FIXTURE, out, tokenizer, fmt=DemoFormat(condition=True, include_text=True), progress=False)
    table = rows(out)
    assert pq.read_schema(next(out.glob("*.parquet"))).equals(demos_schema(include_text=True))
    for r in table:
        if r["depth"] == 0:
            assert r["prompt"].startswith(f"Sub Call Budget: {round(r['children_per_spawn'])} Moving to Node #0\n")
            assert tokenizer.decode(r["prompt_ids"][1:]) == r["prompt"]
        else:
            assert r["prompt"].startswith("Moving to Node #0,")
    assert {r["prompt"][:19] for r in table if r["depth"] == 0} >= {"Sub Call Budget: 0 ", "Sub Call Budget: 2 "}


def test_sosp_records_import_from_search_path(tmp_path, tokenizer):
    problem = Problem(27, (22, 26, 31, 53))
    trace, found = solve_sosp(problem, SolverConfig(), random.Random(0))
    records = [{"target": 27, "nums": [22, 26, 31, 53], "search_path": trace},
               {"target": 28, "nums": [22, 26, 31, 53], "search_path": trace}]  # the trace is another problem's
    path = tmp_path / "sosp.json"
    path.write_text(json.dumps(records))
    summary = import_apr(path, tmp_path / "demos", tokenizer, kind="sosp", progress=False)
    assert summary.demos == 1 and summary.rejections == {"trace": 1}
    (row,) = rows(tmp_path / "demos")
    assert row["kind"] == "sosp" and row["solved"] == found
    assert tokenizer.decode(row["prompt_ids"][1:] + row["completion_ids"]) == trace


def test_every_record_rejected_still_writes_a_readable_empty_dataset(tmp_path, tokenizer):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"target": 3}, []]))
    summary = import_apr(path, tmp_path / "demos", tokenizer, progress=False)
    assert summary.demos == 0 and summary.rejections == {"record": 2}
    assert rows(tmp_path / "demos") == [] and summarize_demos(tmp_path / "demos").sequences == 0


def test_output_directory_is_not_overwritten_unless_asked(tmp_path, tokenizer):
    out = tmp_path / "demos"
    import_apr(FIXTURE, out, tokenizer, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        import_apr(FIXTURE, out, tokenizer, progress=False)
    assert import_apr(FIXTURE, out, tokenizer, progress=False, overwrite=True, limit=2).records == 2


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_imported_demos_stream_to_ranks_in_equal_disjoint_shares(tmp_path, tokenizer, world_size):
    out = tmp_path / "demos"
    import_apr(FIXTURE, out, tokenizer, progress=False, demos_per_row_group=1)  # 3 row groups
    stored = sorted((tuple(r["prompt_ids"]), tuple(r["completion_ids"]) + (EOS_ID,)) for r in rows(out))
    shares = [[(tuple(s.prompt_ids), tuple(s.output_ids))
               for batch in iter_sft_batches(out, 2, shuffle_buffer=4, seed=0, rank=r, world_size=world_size)
               for s in batch] for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1 and shares[0]  # equal steps on every rank
    every = [seq for share in shares for seq in share]
    assert len(set(every)) == len(every) and set(every) <= set(stored)
    assert len(every) >= len(stored) - 3 * (world_size - 1)  # per row group, under one row per rank left out
    if world_size == 1:
        assert sorted(every) == stored
        again = [(tuple(s.prompt_ids), tuple(s.output_ids)) for b in iter_sft_batches(out, 2, shuffle_buffer=4, seed=0)
                 for s in b]
        assert again == shares[0]  # the seed fixes the order
    with pytest.raises(ValueError, match="rank 5"):
        next(iter_sft_batches(out, 2, shuffle_buffer=0, seed=0, rank=5, world_size=world_size))


# --- the streaming reader ------------------------------------------------------------------------

TRICKY = [{"s": "],[{\"x\": 1}, ", "u": "caf\u00e9 \u2713 \U0001f600"}, [1, [2, 3]], "x,]", 12345, {}, None, True]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 4096])
@pytest.mark.parametrize("indent", [None, 2])
def test_reader_yields_each_element_whatever_the_chunking(tmp_path, chunk_bytes, indent):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(TRICKY, indent=indent, ensure_ascii=False), encoding="utf-8")
    seen: list[int] = []
    got = list(iter_json_records(path, chunk_bytes=chunk_bytes, on_bytes=seen.append))
    assert got == list(enumerate(TRICKY))
    assert sum(seen) == path.stat().st_size


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"target": 1}', "expected a JSON list"),
        ("", "expected a JSON list"),
        ('[{"a": 1}, {"a": 2', r"record 1 \(character 11\) is not valid JSON"),
        ('[{"a": 1} {"a": 2}]', "expected ',' or ']' after record 0"),
        ('[{"a": 1},', "file ends inside the list after record 0"),
    ],
)
def test_reader_names_where_a_list_breaks(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ImportFormatError, match=words):
        list(iter_json_records(path, chunk_bytes=4))


def test_reader_accepts_an_empty_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(" [ ] ")
    assert list(iter_json_records(path)) == []


# --- the encoder the import and the generator share -----------------------------------------------


def test_text_encoder_matches_the_tokenizer_on_trace_text(tokenizer):
    encoder = TextEncoder.from_tokenizer(tokenizer)
    assert encoder.split is not None  # the fast path, not the fallback
    texts = ["Sub Call Budget: 10 Token Budget: 1024 ", "1234567 0007 99999\n\n<>", ""]
    for i, problem in enumerate(generate_problems(ProblemConfig(), 6, seed=4)):
        tree = solve_apr(problem, SolverConfig(), random.Random(i))
        for thread in [tree, *(c for group in tree.children for c in group)]:
            texts += thread.segments
        texts.append(solve_sosp(problem, SolverConfig(), random.Random(i))[0])
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encoder(texts) == expected
    clone = pickle.loads(pickle.dumps(encoder))  # what Ray ships to its workers
    assert clone(texts) == expected and clone.bos_id == tokenizer.bos_token_id == 1


def test_text_encoder_falls_back_to_the_tokenizer_for_other_kinds(tokenizer):
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = TextEncoder(backend.to_str(), bos_id=1)
    assert encoder.split is None
    text = "Current State: 27:[22, 26], Operations: []\n"
    assert encoder([text]) == [backend.encode(text, add_special_tokens=False).ids]
