"""The project's tokenizer, built in code: a Hugging Face fast tokenizer for Countdown traces.

Owns the vocabulary (ids are fixed: the same build gives the same ids on every machine, no training
corpus), the text -> token split, saving in a format that both `transformers.AutoTokenizer` and vLLM
load, and a strict encoder for text whose exact round trip matters. Must not import torch, Ray, vLLM
or other apr_ray modules: everything above it depends on it, it depends on nothing of ours.

How text is split (docs/tokenizer.md has the measurements behind each choice):
- keyword phrases of the trace format ("Exploring Operation: ", "<End Calling Sub Searches>", ...)
  are single tokens, longest match first;
- numbers are split into groups of up to 3 digits aligned from the right, like thousands separators
  ("8536" -> "8", "536"; "27" -> "27"), so every value 0..999 is one token, larger values stay short,
  a group's place value is fixed by its position from the right, and any digit string round-trips;
- every other character is its own token, and the vocabulary holds every printable ASCII character,
  so any printable ASCII text round-trips exactly. Other characters become <unk>: `encode_checked`
  refuses them instead (see `check_text`).

Conventions:
- special tokens: <pad>=0, <s>=1 (BOS), </s>=2 (EOS), <unk>=3;
- encoding never adds BOS or EOS by itself (no post-processor): callers that want them ask for them
  (`encode_checked(..., add_bos=True)`) or add the ids themselves, so the runtime and the learner see
  exactly the ids they chose;
- decoding concatenates token strings (`decoders.Fuse`) and never "cleans up" spaces, so
  `decode(encode(text)) == text`, and vLLM's incremental detokenizer (tokenizers' `DecodeStream`)
  yields the same text.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order

# Digits per number group: every value 0..999 is one token; the vocabulary holds every digit string of
# 1..3 digits (1,110 entries) so leading zeros round-trip too. 4 digits would cost 10x the vocabulary
# (an LM head larger than a tiny model's body) for ~3% fewer tokens (docs/tokenizer.md).
NUMBER_GROUP_DIGITS = 3

# Every printable ASCII character (letters, digits, punctuation, space, \t \n \r \x0b \x0c).
ALPHABET = string.printable

# Fixed strings of the trace format (shared/research/apr.md §1), each one token. Matching is longest
# first, so a phrase that is a prefix of another ("No solution found." / "... in sub search") is safe.
# A "\n" may only end a token, never sit inside or start one: then a line boundary is always a token
# boundary, and encode(a + b) == encode(a) + encode(b) whenever `a` ends with "\n" (the runtime appends
# join blocks and child prompts to token ids line by line).
_LINE_ENDS = (  # phrases that end a line: one token with their "\n", one without (text cut mid-line)
    " equal: Goal Reached",
    " unequal: No Solution",
    "No solution found.",
    "No solution found in sub search",
    "<Calling Sub Searches>",
    "<End Calling Sub Searches>",
    "<Sub Searches>",
    "<End Sub Searches>",
)
PHRASES = (
    # serial search (SoS+) and the search inside every APR thread
    "Current State: ",
    ", Operations: ",
    "Exploring Operation: ",
    ", Resulting Numbers: ",
    "Generated Node #",
    " Operation: ",
    "Moving to Node #",
    "Start Sub Search at level ",
    "Exit Sub Search at level ",
    # spawn and join lines (APR)
    "<Start Sub Search ",
    " at level ",
    "<No Solution in Sub Search ",
    "<Goal Reached in Sub Search ",
    " at Node #",
    # conditioning prefixes
    "Sub Call Budget: ",
    "Token Budget: ",
    # punctuation of "27:[22, 26]", "['53-31=22', '22/22=1']", "#0,1,0: 27", "... at Node #0,1>"
    ", ",
    ": ",
    ":[",
    "['",
    "', '",
    "[]\n",
    "]\n",
    "']\n",
    ">\n",
    *_LINE_ENDS,
    *(phrase + "\n" for phrase in _LINE_ENDS),
)


class TokenizerInputError(ValueError):
    """Text that the tokenizer cannot encode exactly."""


def _digit_strings(max_digits: int) -> list[str]:
    return [str(n).zfill(width) for width in range(1, max_digits + 1) for n in range(10**width)]


def split_pattern(number_digits: int = NUMBER_GROUP_DIGITS, phrases: tuple[str, ...] = PHRASES) -> str:
    """The pre-tokenizer regex: phrases (longest first), right-aligned digit groups, any one character.

    A digit group is 1..number_digits digits followed by a whole number of full groups and then a
    non-digit (or the end), so "1234567" splits as "1", "234", "567".
    """
    alternatives = [re.escape(p) for p in sorted(phrases, key=len, reverse=True)]
    group = rf"\d{{{number_digits}}}"
    alternatives.append(rf"\d{{1,{number_digits}}}(?=(?:{group})*(?!\d))")
    alternatives.append(r"[\s\S]")  # any other character on its own, newlines included
    return "|".join(alternatives)


def vocabulary(number_digits: int = NUMBER_GROUP_DIGITS, phrases: tuple[str, ...] = PHRASES) -> dict[str, int]:
    """Token -> id: special tokens, the alphabet, digit groups, phrases; in that order, no duplicates."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *ALPHABET, *_digit_strings(number_digits), *phrases):
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tokenizer(
    number_digits: int = NUMBER_GROUP_DIGITS, phrases: tuple[str, ...] = PHRASES
) -> PreTrainedTokenizerFast:
    """The project tokenizer. Deterministic: the same arguments give the same vocabulary and ids.

    The arguments exist to measure alternative schemes (docs/tokenizer.md); models use the defaults.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not 1 <= number_digits <= 4:
        raise ValueError(f"number_digits must be in 1..4 (vocabulary grows 10x per digit), got {number_digits}")
    backend = Tokenizer(models.WordLevel(vocabulary(number_digits, phrases), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(split_pattern(number_digits, phrases)), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Already in the vocabulary at ids 0..3; registering them makes the literal strings map to those ids
    # (before the regex split) and lets decode(skip_special_tokens=True) drop them.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Write the tokenizer in HF format (tokenizer.json + tokenizer_config.json) to `out_dir`.

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, which transformers 4 and some vLLM
    code paths cannot resolve; it is rewritten to the portable `PreTrainedTokenizerFast`
    (shared/research/apis.md §5.2). Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["clean_up_tokenization_spaces"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by `save_tokenizer` (or any model directory holding one).

    Same result as `AutoTokenizer.from_pretrained(path)`, without importing the auto classes (which pull
    in torch and every model: ~15 s on 2 cores), so data-only processes stay light.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: write one with apr_ray.tokenizer.save_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def check_text(text: str) -> None:
    """Raise TokenizerInputError unless `text` encodes to ids that decode back to exactly `text`.

    That holds for any printable ASCII text without the special-token strings ("<s>", "</s>", "<pad>",
    "<unk>"), which would otherwise be read as control tokens.
    """
    for pos, char in enumerate(text):
        if char not in ALPHABET:
            raise TokenizerInputError(
                f"character {char!r} (U+{ord(char):04X}) at position {pos} is not printable ASCII; "
                f"the tokenizer would map it to {UNK}: {text[max(0, pos - 30): pos + 30]!r}"
            )
    for special in SPECIAL_TOKENS:
        pos = text.find(special)
        if pos >= 0:
            raise TokenizerInputError(
                f"special-token string {special!r} at position {pos} in text; it would encode as a control "
                f"token, not as text: {text[max(0, pos - 30): pos + 30]!r}"
            )


def encode_checked(
    tokenizer: PreTrainedTokenizerFast, text: str, *, add_bos: bool = False, add_eos: bool = False
) -> list[int]:
    """Token ids for `text`, refusing text that would not round-trip (see `check_text`).

    BOS / EOS are added only when asked.
    """
    check_text(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if add_bos else []) + ids + ([tokenizer.eos_token_id] if add_eos else [])
