"""The tokenizer built in code: fixed ids, exact round trips (batch and streaming), saving for
transformers / vLLM, strict encoding, and solver demonstrations."""

import json
import random
import string

import pytest
from tokenizers.decoders import DecodeStream

from apr_ray.tokenizer import (
    ALPHABET,
    PHRASES,
    SPECIAL_TOKENS,
    TokenizerInputError,
    build_tokenizer,
    check_text,
    encode_checked,
    load_tokenizer,
    save_tokenizer,
)

SOSP_TRACE = (
    "Token Budget: 512 Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
    "Exploring Operation: 97*88=8536, Resulting Numbers: [8536, 1]\n"
    "8536,27 unequal: No Solution\n"
    "Start Sub Search at level 1: Moving to Node #0,0\n"
    "Current State: 27:[26, 31, 31], Operations: ['53-22=31']\n"
    "Exploring Operation: 26*31=806, Resulting Numbers: [31, 806]\n"
    "Generated Node #0,0,0: 27:[31, 806] Operation: 26*31=806\n"
    "Exploring Operation: 31*806=24986, Resulting Numbers: [24986]\n"
    "24986,27 unequal: No Solution\n"
    "No solution found.\n"
    "Exit Sub Search at level 1\n"
    "No solution found in sub search\n"
    "Start Sub Search at level 1: Moving to Node #0,1\n"
    "Current State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
    "Exit Sub Search at level 1\n"
)

APR_PARENT = (
    "Sub Call Budget: 10 Moving to Node #0\n"
    "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "Exploring Operation: 53-22=31, Resulting Numbers: [26, 31, 31]\n"
    "Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31\n"
    "Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n"
    "Generated Node #0,1: 27:[22, 26, 22] Operation: 53-31=22\n"
    "<Calling Sub Searches>\n"
    "<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
    "<Start Sub Search 1 at level 1> Moving to Node #0,1\n"
    "<End Calling Sub Searches>\n"
)
APR_JOINED = (
    "Moving to Node #0\n"
    "Current State: 27:[22, 26, 31, 53], Operations: []\n"
    "<Sub Searches>\n"
    "<No Solution in Sub Search 0 at level 1 at Node #0,0>\n"
    "<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n"
    "Moving to Node #0,1\n"
    "Current State: 27:[22, 26, 22], Operations: ['53-31=22']\n"
    "Exploring Operation: 22/22=1, Resulting Numbers: [26, 1]\n"
    "Generated Node #0,1,0: 27:[26, 1] Operation: 22/22=1\n"
    "Moving to Node #0,1,0\n"
    "Current State: 27:[26, 1], Operations: ['53-31=22', '22/22=1']\n"
    "Exploring Operation: 26+1=27, Resulting Numbers: [27]\n"
    "27,27 equal: Goal Reached\n"
    "<End Sub Searches>\n"
    "27,27 equal: Goal Reached\n"
)
HAND_TRACES = [SOSP_TRACE, APR_PARENT, APR_JOINED, "26,27 unequal: No Solution\nNo solution found."]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _stream_decode(tok, ids, skip_special_tokens=True):
    stream = DecodeStream(skip_special_tokens=skip_special_tokens)
    return "".join(stream.step(tok.backend_tokenizer, i) or "" for i in ids)


def test_special_ids_and_deterministic_vocab(tok):
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert build_tokenizer().get_vocab() == tok.get_vocab()
    vocab = tok.get_vocab()
    assert len(vocab) == len(tok) == len(set(vocab.values()))
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_hand_traces_round_trip_without_unk(tok):
    for text in HAND_TRACES:
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert _stream_decode(tok, ids) == text


def test_lines_split_into_phrases_and_whole_numbers(tok):
    tokens = tok.tokenize("Exploring Operation: 53-31=22, Resulting Numbers: [22, 26, 22]\n")
    assert tokens == ["Exploring Operation: ", "53", "-", "31", "=", "22", ", Resulting Numbers: ",
                      "[", "22", ", ", "26", ", ", "22", "]\n"]
    tokens = tok.tokenize("<Goal Reached in Sub Search 1 at level 1 at Node #0,1>\n")
    assert tokens == ["<Goal Reached in Sub Search ", "1", " at level ", "1", " at Node #", "0", ",", "1", ">\n"]
    assert tok.tokenize("No solution found in sub search\nNo solution found.") == [
        "No solution found in sub search\n", "No solution found."]
    assert all(len(tok.tokenize(str(n))) == 1 for n in range(1000))


@pytest.mark.parametrize(
    ("number", "groups"),
    [("1000", ["1", "000"]), ("8536", ["8", "536"]), ("1088640", ["1", "088", "640"]),
     ("0012", ["0", "012"]), ("99999999999999999999", ["99", "999", "999", "999", "999", "999", "999"])],
)
def test_large_numbers_split_in_right_aligned_groups(tok, number, groups):
    assert tok.tokenize(number) == groups
    text = f"Exploring Operation: 97*{number}={number}0, Resulting Numbers: [{number}]\n"
    assert tok.decode(tok.encode(text)) == text


def test_any_printable_ascii_round_trips(tok):
    rng = random.Random(0)
    texts = [ALPHABET, string.printable[::-1], "<s", "s>", "</", "<pad", "unk>", "  \t\r\n\x0b\x0c  "]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 300))) for _ in range(200)]
    texts += ["".join(rng.choice("0123456789, []\n'") for _ in range(rng.randint(1, 100))) for _ in range(100)]
    for text in texts:
        check_text(text)
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        assert _stream_decode(tok, ids) == text


def test_non_ascii_is_unk_and_encode_checked_refuses_it(tok):
    assert tok.encode("27é") == [tok.convert_tokens_to_ids("27"), tok.unk_token_id]
    with pytest.raises(TokenizerInputError, match=r"'é' \(U\+00E9\) at position 2"):
        encode_checked(tok, "27é")
    with pytest.raises(TokenizerInputError, match="U\\+2212"):
        encode_checked(tok, "53\u221231=22")


def test_encode_checked_refuses_special_token_strings(tok):
    with pytest.raises(TokenizerInputError, match="'</s>' at position 3"):
        encode_checked(tok, "abc</s>")
    # Plain encode reads them as control tokens, as every HF tokenizer does.
    assert tok.encode("a</s>") == [tok.convert_tokens_to_ids("a"), tok.eos_token_id]


def test_no_bos_or_eos_unless_asked(tok):
    text = "Moving to Node #0\n"
    ids = tok.encode(text)
    assert tok(text)["input_ids"] == ids == tok.encode(text, add_special_tokens=False)
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert encode_checked(tok, text) == ids
    assert encode_checked(tok, text, add_bos=True, add_eos=True) == [tok.bos_token_id, *ids, tok.eos_token_id]
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert _stream_decode(tok, [tok.bos_token_id, *ids, tok.eos_token_id]) == text


def test_newline_only_ends_tokens_so_line_boundaries_are_token_boundaries(tok):
    for token in tok.get_vocab():
        assert "\n" not in token[:-1], token
    lines = SOSP_TRACE.splitlines(keepends=True)
    for cut in range(1, len(lines)):
        head, tail = "".join(lines[:cut]), "".join(lines[cut:])
        assert tok.encode(head) + tok.encode(tail) == tok.encode(head + tail)


def test_phrases_are_single_tokens(tok):
    for phrase in PHRASES:
        assert tok.tokenize(phrase) == [phrase]


def test_save_and_load_with_auto_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    for loaded in (AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id] == [0, 1, 2, 3]
        for text in HAND_TRACES:
            ids = loaded(text)["input_ids"]
            assert ids == tok.encode(text)
            assert loaded.decode(ids) == text


def test_load_tokenizer_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)


def test_solver_demonstrations_round_trip(tok):
    from apr_ray.countdown.problems import Problem
    from apr_ray.countdown.solvers import SolverConfig, solve_apr, solve_sosp

    rng = random.Random(3)
    cfg = SolverConfig()
    texts: list[str] = []

    def threads(demo):
        texts.extend(demo.segments)
        for children in demo.children:
            for child in children:
                threads(child)

    for _ in range(60):
        problem = Problem(rng.randint(10, 100), tuple(rng.randint(1, 99) for _ in range(4)))
        texts.append(solve_sosp(problem, cfg, rng)[0])
        threads(solve_apr(problem, cfg, rng))
    assert len(texts) > 300
    assert any("<End Calling Sub Searches>" in t for t in texts) and any("Goal Reached" in t for t in texts)
    encodings = tok.backend_tokenizer.encode_batch(texts)
    for text, encoding in zip(texts, encodings):
        assert tok.unk_token_id not in encoding.ids
        assert tok.decode(encoding.ids) == text
    for text, encoding in zip(texts[:40], encodings[:40]):
        assert _stream_decode(tok, encoding.ids) == text
