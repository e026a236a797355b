"""Long lines cut at safe boundaries (bertpipe/data/lines.py): sentence ends first, never inside a UTF-8
character, nothing changed where no line is long, and never an empty line (a document boundary)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bertpipe.data.lines import MAX_LINE_BYTES, cut_long_lines, cut_point


def test_the_limit_leaves_every_paragraph_of_wikitext_whole(shared_wikitext: Path) -> None:
    for split in ("valid", "test"):
        data = (shared_wikitext / f"wiki.{split}.tokens").read_bytes()
        assert max(map(len, data.split(b"\n"))) * 10 < MAX_LINE_BYTES  # 2,225 bytes at most: far below it
        out, cuts = cut_long_lines(data)
        assert (out, cuts) == (data, 0) and out is data


def test_lines_of_exactly_the_limit_are_left_alone() -> None:
    data = b"a" * 10 + b"\n" + "é".encode() * 5 + b"\n\n" + b"b c." * 2 + b"\n"
    assert cut_long_lines(data, limit=10) == (data, 0)


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("One two. Three four five six seven", 30, "One two."),  # a sentence end before the last space
    ('He said "stop." Then we all went home', 30, 'He said "stop."'),  # closing quotes stay with it
    ("Was it (really?) so. No it was not at all", 25, "Was it (really?) so."),
    ("今日は晴れです。明日は雨でしょう", 30, "今日は晴れです。"),  # a CJK full stop needs no space
    ("「本当です。」と彼は言いました", 30, "「本当です。」"),
    ("It costs 3.5 dollars and more of them", 20, "It costs 3.5 "),  # a dot in a number: not an end
    ("abcdefghij klmnop", 9, "abcdefghi"),  # no whitespace at all in the window: a character boundary
])
def test_cut_point_prefers_sentence_ends_then_whitespace(text: str, limit: int, expected: str) -> None:
    data = text.encode()
    cut = cut_point(data, 0, limit)
    assert data[:cut].decode() == expected
    assert 0 < cut <= limit


def test_cut_point_looks_only_inside_its_window() -> None:
    data = b"Skip. this part. Then one two three four"
    start = data.index(b"this")
    assert data[start:cut_point(data, start, 14)] == b"this part."
    assert data[start:cut_point(data, start, 10)] == b"this part."  # the space after the window tells the end
    assert data[start:cut_point(data, start, 9)] == b"this "


def test_cut_point_never_splits_a_character() -> None:
    rng = random.Random(0)
    alphabet = ["a", "é", "中", "😀", "\u0301", "ß"]  # 1 to 4 bytes, and a combining mark
    for _ in range(300):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40))).encode()
        starts = [i for i in range(len(data)) if data[i] & 0xC0 != 0x80]
        start = rng.choice(starts[:-1]) if len(starts) > 1 else 0
        for limit in range(1, 12):
            cut = cut_point(data, start, limit)
            assert cut > start
            assert cut <= start + limit or cut == start + len(data[start:].decode()[0].encode())
            data[start:cut].decode()  # raises if the cut is inside a character
            data[cut:].decode()


def words(data: bytes) -> list[bytes]:
    return data.split()


def sentence_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = ["the", "lobster", "grows", "slowly", "in", "cold", "water", "and", "is", "caught", "near", "rocks"]
    return " ".join(" ".join([rng.choice(vocabulary).capitalize(), *rng.choices(vocabulary, k=rng.randint(4, 14))])
                    + rng.choice([".", "!", "?", '."']) for _ in range(n))


def test_long_lines_are_cut_at_sentence_ends_into_pieces_of_at_most_the_limit() -> None:
    line = sentence_text(2000).encode()
    data = b"short line.\n" + line + b"\n\n" + line + b"\n"
    out, cuts = cut_long_lines(data, limit=4096)
    pieces = out.split(b"\n")
    assert max(map(len, pieces)) <= 4096
    assert cuts == out.count(b"\n") - data.count(b"\n") >= 2 * len(line) // 4096
    assert out.count(b"\n\n") == 1  # the one document boundary, no new one
    assert words(out) == words(data)  # only whitespace dropped at the cuts
    long_pieces = [p for p in pieces if len(p) > 100]
    assert all(p.endswith((b".", b"!", b"?", b'."')) and not p.startswith(b" ") for p in long_pieces[:-1])
    assert out.startswith(b"short line.\n")


@pytest.mark.parametrize("data", [
    b"xy " * 30 + b"   " * 20 + b"\n\nnext\n",  # a cut right before a line's trailing blanks
    b"one. " + b" " * 100 + b"\n\nnext\n",
    b"   " * 50 + b"\n\nnext\n",  # a line of blanks only
    b" " * 60 + b"text here\n\nnext\n",  # leading blanks longer than the limit
    b"a\n" + b"Dots. " * 50 + b"\n",
])
def test_a_cut_never_makes_an_empty_line(data: bytes) -> None:
    out, _ = cut_long_lines(data, limit=32)
    assert out.split(b"\n").count(b"") == data.split(b"\n").count(b"")  # a line of blanks is dropped whole
    assert out.endswith(b"\n")
    assert words(out) == words(data)
    assert max(map(len, out.split(b"\n"))) <= 32


def test_a_line_without_whitespace_is_cut_between_characters() -> None:
    data = ("中文" * 5000 + "\n").encode()
    out, cuts = cut_long_lines(data, limit=1000)
    assert out.decode().replace("\n", "") == data.decode().replace("\n", "")
    assert cuts == len(data) // 999 and max(map(len, out.split(b"\n"))) <= 1000
