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
from typing import Callable, Sequence

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
