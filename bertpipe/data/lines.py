"""Long lines cut at safe boundaries, so that reading text takes linear time whatever its lines' lengths.

A line is a paragraph (`bertpipe.data.corpus`), and sentencex segments a paragraph in time quadratic
in its length when its quotes do not pair up (wikimedia/sentencex#73): a document without line breaks
(scraped text, a JSON `text` field without newlines) of 2 MB took 30-40 s against 1.3 s for the same
text as paragraphs, and 100 MB would take about a day. So no line is longer than `MAX_LINE_BYTES`: a
longer one is cut into pieces of at most that many bytes, each at the last sentence end in its window
(`.`, `!` or `?`, then any closing quotes or brackets, before whitespace; or a full stop of Chinese,
Japanese, Hindi, Arabic, ...), else after its last whitespace, else between two UTF-8
characters. Whitespace at a cut is dropped, and a cut never makes an empty line (the document boundary
of `bertpipe.data.ingest`'s text) nor a line that starts with a space (as WikiText's headings do).

The trade-off: each piece is a line of its own, so a paragraph of its own (a sentence of the document's
paragraph under `prepare.sentences: lines`), in the same document. Next-sentence prediction loses the
one sentence pair that spans a cut, and a sentence is cut in two only when no sentence end lies in the
window. Document boundaries stay where they were, and text whose lines are all shorter is read byte
for byte as before: WikiText-2's longest line is 2,225 bytes, 1/15 of the limit.

`MAX_LINE_BYTES` is measured: `sentencex.segment("en", ...)` over 2 MB of WikiText-2's validation text
took 0.016 s per MB as paragraphs, and as one line cut into lines of 4, 16, 32, 64, 256 KiB and 1 MiB,
1.4x, 3.3x, 4.4x, 5.8x, 7.9x and 8.1x that, detokenized (quotes attached, as ordinary text has them);
2.1x, 17x, 28x, 45x, 114x and 640x as WikiText's own tokens, whose spaced quotes never pair (the
quadratic case). The whole `prepare` stage on 11 MB of it (sentencex, word tokenizer) took 0.75-0.85 s
as paragraphs and, as one line, 1.2 s detokenized and 6 s as tokens with 32 KiB lines, against 1.7 s and
29 s with 256 KiB lines.
"""

from __future__ import annotations

import re

MAX_LINE_BYTES = 32 << 10  # measured: see the module docstring
_WHITESPACE = b" \t\x0b\x0c\r"  # ASCII whitespace other than the line end; dropped at a cut
_SPACES = (*(bytes([b]) for b in _WHITESPACE), "\u3000".encode())  # and the ideographic space
_CLOSING = "\"')]\u2019\u201d\u00bb\u300d\u300f"  # quotes and brackets that may follow a sentence's end
_CLOSERS = re.compile(b"(?:" + b"|".join(re.escape(c.encode()) for c in _CLOSING) + b")*")
_ASCII_END = re.compile(rb"[.!?]" + _CLOSERS.pattern + rb"(?=[ \t\x0b\x0c\r\n]|\xe3\x80\x80)")  # then whitespace
_FULL_STOPS = tuple(c.encode() for c in "\u3002\uff01\uff1f\uff61\u0964\u0965\u061f\u06d4\u0589\u1362\u104b")
# CJK (U+3002 FF01 FF1F FF61), Devanagari, Arabic, Urdu, Armenian, Ethiopic and Myanmar full stops: cut after
_SPACE_RUN = re.compile(rb"[ \t\x0b\x0c\r]*")
_FIRST_SPAN = 256  # the tail searched first for a sentence end; most sentences end within it


def cut_point(data: bytes, start: int, limit: int = MAX_LINE_BYTES) -> int:
    """Where to cut the line that starts at `start` in `data` and runs past `start + limit`.

    The end of the last sentence end in `data[start:start + limit]`, else the end of its last
    whitespace, else the last UTF-8 character boundary; always after `start` (one character past
    `limit` only when `limit` is shorter than the character at `start`).
    """
    end = min(start + limit, len(data))
    at = _last_sentence_end(data, start, end)
    if at <= start:
        at = _last_space_end(data, start, end)
    if at > start:
        return at
    cut = end
    while start < cut < len(data) and data[cut] & 0xC0 == 0x80:  # a continuation byte: inside a character
        cut -= 1
    if cut == start:
        cut += 1
        while cut < len(data) and data[cut] & 0xC0 == 0x80:
            cut += 1
    return cut


def cut_long_lines(data: bytes, limit: int = MAX_LINE_BYTES) -> tuple[bytes, int]:
    """`data` (newline-terminated UTF-8 lines) with every line longer than `limit` bytes cut at
    `cut_point`s into pieces of at most `limit` bytes; and how many cuts were made.

    `data` itself comes back when no line is long: finding that out takes one `rfind` per `limit`
    bytes, which reads back only to the last line end of each window.
    """
    out, cuts, done, pos = [], 0, 0, 0
    while pos < len(data):
        line_end = data.rfind(b"\n", pos, pos + limit + 1)
        if line_end >= 0:  # every line starting in the window ends in it
            pos = line_end + 1
            continue
        cut = cut_point(data, pos, limit)
        piece_end = cut
        while piece_end > pos and data[piece_end - 1] in _WHITESPACE:
            piece_end -= 1
        after = _SPACE_RUN.match(data, cut).end()
        out.append(data[done:piece_end])
        ends_line = after == len(data) or data[after] == ord("\n")
        if piece_end > pos and not ends_line:  # a piece, and text after it: a cut
            out.append(b"\n")
            cuts += 1
        elif piece_end == pos and ends_line:  # a line of whitespace only: dropped with its line end
            after += 1
        done = pos = after
    if not done:
        return data, 0
    out.append(data[done:])
    return b"".join(out), cuts


def _last_sentence_end(data: bytes, start: int, end: int) -> int:
    """Just after the last sentence end in `data[start:end]` (closing quotes included), or -1."""
    stop = max(_after_last(data, mark, start, end) for mark in _FULL_STOPS)
    if stop > 0:
        stop = _CLOSERS.match(data, stop, end).end()
    span = _FIRST_SPAN  # `.`, `!` or `?`: a regular expression, so the window's tail first, then 4x longer, ...
    while True:
        lo = max(start, end - span)
        if stop >= lo:  # a full stop nearer the end than anything left to search
            lo = stop
        ends = [m.end() for m in _ASCII_END.finditer(data, lo, min(end + 1, len(data))) if m.end() <= end]
        if ends or lo <= start or lo == stop:
            return max(ends[-1] if ends else -1, stop)
        span *= 4


def _last_space_end(data: bytes, start: int, end: int) -> int:
    """Just after the last whitespace in `data[start:end]`, or -1."""
    return max(_after_last(data, space, start, end) for space in _SPACES)


def _after_last(data: bytes, needle: bytes, start: int, end: int) -> int:
    at = data.rfind(needle, start, end)
    return at + len(needle) if at >= 0 else -1
