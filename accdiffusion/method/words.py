"""Words of a WebUI prompt, their token positions, and prompts rebuilt from a subset of them.

A *word* is a run of text between whitespace and prompt syntax that holds a letter or digit:
``red-haired`` is one word of three CLIP tokens. Syntax stays out of words and is kept when a
prompt is rebuilt, so ``(red:1.3)`` stays emphasised, ``[a:b:0.5]`` stays scheduled and BREAK
stays a break. Words are tied to the context positions the UNet saw by tokenizing each word with
the host's own tokenizer and finding its ids, in order, among the prompt's context ids; this
follows the host's chunking (75 tokens, BREAK, comma backtracking) without re-implementing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

# Syntax characters of A1111/Forge prompts: attention (), [], weights after ':', alternation '|',
# extra networks <...>, and the separators ',' and whitespace.
_RUN = re.compile(r"<[^<>]*>|\\[()\[\]]|[^\s()\[\]:|,<>\\]+|.", re.S)
_KEYWORDS = {"BREAK", "AND"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # offsets into the prompt
    end: int


def split_words(prompt: str) -> list[Word]:
    words: list[Word] = []
    previous_syntax = ""
    for match in _RUN.finditer(prompt):
        run = match.group(0)
        is_word = (not run.startswith("<") and not run.startswith("\\") and run not in _KEYWORDS
                   and any(ch.isalnum() for ch in run)
                   and not (previous_syntax == ":" and _NUMBER.fullmatch(run)))
        if is_word:
            words.append(Word(run, match.start(), match.end()))
        if not run.isspace():
            previous_syntax = run
    return words


def align_words(words: Sequence[Word], context_ids: Sequence[int], special_ids: set[int],
                tokenize: Callable[[str], list[int]]) -> list[list[int]]:
    """Context positions of each word's tokens ([] when the word cannot be found, e.g. a
    textual-inversion embedding whose ids the host replaced)."""
    stream = [(pos, tid) for pos, tid in enumerate(context_ids) if tid not in special_ids]
    ids_only = [tid for _, tid in stream]
    positions: list[list[int]] = []
    cursor = 0
    for word in words:
        ids = tokenize(word.text)
        found = _find(ids_only, ids, cursor) if ids else -1
        if found < 0:
            positions.append([])
            continue
        positions.append([stream[found + i][0] for i in range(len(ids))])
        cursor = found + len(ids)
    return positions


def _find(haystack: Sequence[int], needle: Sequence[int], start: int) -> int:
    n = len(needle)
    first = needle[0]
    for i in range(start, len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i:i + n]) == list(needle):
            return i
    return -1


# --- LLM text encoders (Neo's Qwen3 / Qwen2.5-VL / Gemma / Mistral engines) ------------------------
# Their byte-level BPE gives a word a different id after a space ("Ġcat") than alone ("cat"), and
# each piece of the prompt reaches the model wrapped in a chat template whose own words ("user",
# "system: Describe the image ...") must never be taken for the prompt's. So words are found by
# their text: every token is turned back into its bytes, the template's fixed text is stepped over
# and each word's bytes are looked up, in order, inside the prompt's part of the stream.


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE vocabularies spell each byte with (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the other bytes are shifted past 255)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


_BYTE_OF = _byte_level_alphabet()


def token_bytes(token: str, byte_level: bool = True) -> bytes:
    """The bytes a vocabulary entry stands for: byte-level BPE spellings decoded; SentencePiece's
    '▁' is a space; anything else (a special token such as ``<|im_start|>``) is its own text.
    ``byte_level=False``: the vocabulary is SentencePiece's, whose "ö" is the letter, not byte 0xF6."""
    if byte_level and token and all(ch in _BYTE_OF for ch in token):
        return bytes(_BYTE_OF[ch] for ch in token)
    return token.replace("\u2581", " ").encode("utf-8")


def is_byte_level(tokens: Sequence[str]) -> bool:
    """Whether vocabulary entries are GPT-2-style byte-level spellings: SentencePiece spells a
    space '▁', which no byte-level alphabet has."""
    return not any("\u2581" in token for token in tokens)


def template_spans(text: bytes, template: str | None) -> list[tuple[int, int]]:
    """Byte ranges of ``text`` that came from the prompt, when each piece of the prompt was
    formatted into ``template`` (a ``str.format`` pattern with one ``{}``) and the results joined;
    the whole text when there is no template."""
    if not template or "{}" not in template:
        return [(0, len(text))]
    prefix, suffix = (part.encode("utf-8") for part in template.split("{}", 1))
    if not prefix and not suffix:  # "{}": nothing around the prompt (and an empty prefix would match forever)
        return [(0, len(text))]
    spans: list[tuple[int, int]] = []
    cursor = 0
    while True:
        found = text.find(prefix, cursor)
        if found < 0:
            return spans
        start = found + len(prefix)
        if start == len(text) and spans and not prefix:
            return spans  # a template without prefix matches again at the very end
        # without a suffix a piece runs to the next piece's prefix
        end = text.find(suffix if suffix else prefix, start)
        end = len(text) if end < 0 else end
        spans.append((start, end))
        cursor = end + len(suffix)


def align_words_by_text(words: Sequence[Word], pieces: Sequence[bytes],
                        spans: Sequence[tuple[int, int]] | None = None) -> list[list[int]]:
    """Context positions of each word's tokens, found by text: ``pieces`` are the bytes of each
    context token in order, ``spans`` the byte ranges of their joined text that hold the prompt
    (:func:`template_spans`). A word's positions are the tokens its bytes overlap; [] when the
    word is not in the prompt's part (e.g. dropped by the host's parser)."""
    text = b"".join(pieces)
    starts = []
    offset = 0
    for piece in pieces:
        starts.append(offset)
        offset += len(piece)
    spans = list(spans) if spans is not None else [(0, len(text))]
    positions: list[list[int]] = []
    cursor = 0
    for word in words:
        needle = word.text.encode("utf-8")
        hit = _find_in_spans(text, needle, spans, cursor)
        if hit is None:
            positions.append([])
            continue
        end = hit + len(needle)
        positions.append([i for i, s in enumerate(starts) if s < end and s + len(pieces[i]) > hit])
        cursor = end
    return positions


def _find_in_spans(text: bytes, needle: bytes, spans: Sequence[tuple[int, int]], cursor: int) -> int | None:
    """The first place of ``needle`` at or after ``cursor`` inside the spans, as a whole word where
    there is one ("a" not inside "Start": the host's parser may keep text that is no word of ours,
    e.g. ``<Prompt Start>``), else the first place at all (scripts without spaces)."""
    first = None
    for start, end in spans:
        if end <= cursor:
            continue
        found = text.find(needle, max(start, cursor), end)
        while found >= 0:
            if first is None:
                first = found
            after = found + len(needle)
            if (found == start or not _word_byte(text[found - 1])) and (after == end or not _word_byte(text[after])):
                return found
            found = text.find(needle, found + 1, end)
    return first


def _word_byte(byte: int) -> bool:
    return byte < 128 and chr(byte).isalnum()


def normalise(text: str) -> str:
    return text.lower().strip(".!?;'\"")


def match_words(words: Sequence[Word], reference: Sequence[Word]) -> list[int | None]:
    """For each word, the index of the same word (case-insensitive) in ``reference``, matched in
    order; None where the word is new. Used when the hires prompt differs from the first one."""
    out: list[int | None] = []
    cursor = 0
    used: set[int] = set()
    ref_norm = [normalise(w.text) for w in reference]
    for word in words:
        key = normalise(word.text)
        hit = next((j for j in range(cursor, len(ref_norm)) if ref_norm[j] == key and j not in used), None)
        if hit is None:  # out of order: take an unused earlier occurrence
            hit = next((j for j in range(cursor) if ref_norm[j] == key and j not in used), None)
        else:
            cursor = hit + 1
        if hit is not None:
            used.add(hit)
        out.append(hit)
    return out


# A group left with no word: only blanks, commas, '|' and ':' with an optional weight or step
# ("(:1.2)", "[::0.5]", "(, )"); a number on its own ("[3]") is a word and stays.
_EMPTY_GROUP = re.compile(r"\((?:[\s,|]|:\s*[+-]?[\d.]*)*\)|\[(?:[\s,|]|:\s*[+-]?[\d.]*)*\]")
_COMMAS = re.compile(r"(?:\s*,)+")
_SPACES = re.compile(r"[ \t]+")
_COMMA_AFTER_OPEN = re.compile(r"([(\[|:])\s*,")
_COMMA_BEFORE_CLOSE = re.compile(r",\s*(?=[)\]|:])")
_BREAK = re.compile(r"\bBREAK\b")


def compose_prompt(prompt: str, words: Sequence[Word], keep: Sequence[bool]) -> str:
    """The prompt with the words not kept removed and everything else (syntax, punctuation,
    order) left. What dropped words leave behind is tidied away, because each of these changes the
    encoding: a group left empty ("()", "(:1.2)", "[::0.5]"), a run of commas or a comma against a
    bracket, and a BREAK with no word on one side (leading, trailing or doubled), which would add
    a chunk of padding only. A prompt left with no words becomes ""."""
    if len(words) != len(keep):
        raise ValueError("one keep flag per word")
    if all(keep):
        return prompt
    if not any(keep):
        return ""
    pieces: list[str] = []
    last = 0
    for word, kept in zip(words, keep):
        if not kept:
            pieces.append(prompt[last:word.start])
            last = word.end
    pieces.append(prompt[last:])
    text = "".join(pieces)
    previous = None
    while previous != text:
        previous = text
        text = _EMPTY_GROUP.sub("", text)
        text = _COMMAS.sub(",", text)
        text = _COMMA_AFTER_OPEN.sub(r"\1", text)
        text = _COMMA_BEFORE_CLOSE.sub("", text)
    text = _drop_empty_breaks(text)
    text = _SPACES.sub(" ", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"\s+([),\]])", r"\1", text)
    text = re.sub(r",(?=\S)(?![)\]])", ", ", text)
    text = text.strip().strip(",").strip()
    return text


def _drop_empty_breaks(text: str) -> str:
    """Keep a BREAK only between two pieces that each hold a word; the brackets of a dropped
    BREAK's piece stay, so groups stay balanced."""
    pieces = _BREAK.split(text)
    out = pieces[0]
    has_words = bool(split_words(pieces[0]))  # words since the last kept BREAK
    for piece in pieces[1:]:
        piece_has_words = bool(split_words(piece))
        if has_words and piece_has_words:
            out = out.rstrip(" \t,") + " BREAK " + piece.lstrip(" \t,")
        else:
            out += " " + piece
            has_words = has_words or piece_has_words
    return out


# --- prompt units: words or phrases ------------------------------------------------------------
# What ends a phrase between two words: a comma, semicolon, period, exclamation or question mark,
# a line break, BREAK or AND (the last two never split a word, so they are seen in the gap).
_PHRASE_GAP = re.compile(r"[,;.!?\n]|\bBREAK\b|\bAND\b")
_PHRASE_END = re.compile(r"[;.!?]$")  # punctuation the word pattern keeps inside a word ("disk.")
_GAP_NUMBER = re.compile(r"\d*\.\d+|\d+\.?")  # a weight or step ("(cat:1.2)", "[a:b:0.5]"): not a period
# Words that join two phrases of a sentence prompt ("a girl with red hair", "a cat and a dog"):
# chosen by measurement on the toy model (docs/phrases.md).
CONNECTIVES: tuple[str, ...] = ("and", "with")


@dataclass(frozen=True)
class PromptUnits:
    """How a prompt's words are kept or dropped: each unit's words (indices into the prompt's
    words) go together; a *joiner* is a connective word between two units, kept when the unit
    after it is kept and an earlier unit is too (so "a cat and a dog" keeps "and" only with both,
    and a tile with the dog alone gets "a dog")."""
    members: tuple[tuple[int, ...], ...]
    joiners: tuple[tuple[int, int], ...]  # (word index, index of the unit after it)
    n_words: int

    @staticmethod
    def each_word(n_words: int) -> "PromptUnits":
        """The paper's units: every word on its own."""
        return PromptUnits(tuple((i,) for i in range(n_words)), (), n_words)

    def word_keep(self, unit_keep: "torch.Tensor") -> "torch.Tensor":
        """[..., units] bool → [..., words] bool."""
        import torch

        out = torch.zeros(*unit_keep.shape[:-1], self.n_words, dtype=torch.bool)
        for u, members in enumerate(self.members):
            out[..., list(members)] = unit_keep[..., u:u + 1]
        for word, after in self.joiners:
            out[..., word] = unit_keep[..., after] & unit_keep[..., :after].any(-1)
        return out


def phrase_units(prompt: str, words: Sequence[Word],
                 connectives: Sequence[str] = CONNECTIVES) -> PromptUnits:
    """Phrases: the runs of words between separators (``_PHRASE_GAP`` in the text between two
    words, ``_PHRASE_END`` at a word's end, or a connective word). A connective with no phrase on
    one side belongs to the phrase on the other, so keeping every unit keeps the whole prompt."""
    connective = {c.lower() for c in connectives}
    runs: list[list[int]] = [[]]
    between: list[list[int]] = [[]]  # connectives before each run
    for i, word in enumerate(words):
        if i and (_PHRASE_GAP.search(_GAP_NUMBER.sub("", prompt[words[i - 1].end:word.start]))
                  or _PHRASE_END.search(words[i - 1].text)):
            if runs[-1]:
                runs.append([])
                between.append([])
        if word.text.lower() in connective:
            if runs[-1]:
                runs.append([])
                between.append([])
            between[-1].append(i)
        else:
            runs[-1].append(i)
    if not runs[-1]:  # trailing connectives (or no words): they join the last phrase
        trailing = between.pop()
        runs.pop()
        if runs:
            runs[-1].extend(trailing)
        elif trailing:
            runs.append(trailing)
            between.append([])
    if runs and between[0]:  # leading connectives join the first phrase
        runs[0] = between[0] + runs[0]
        between[0] = []
    joiners = tuple((w, u) for u, ws in enumerate(between) for w in ws)
    return PromptUnits(tuple(tuple(sorted(r)) for r in runs), joiners, len(words))


def prompt_units(prompt: str, words: Sequence[Word], kind: str,
                 connectives: Sequence[str] = CONNECTIVES) -> PromptUnits:
    """``kind``: "words" (the paper's) or "phrases"."""
    if kind == "words":
        return PromptUnits.each_word(len(words))
    if kind == "phrases":
        return phrase_units(prompt, words, connectives)
    raise ValueError(f"unknown prompt units {kind!r}: expected 'phrases' or 'words'")
