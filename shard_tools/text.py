"""The one escaping function for text that came from a file or the network, before it is printed.

A value read from a manifest, an index, a config or an object store may hold a newline (a forged
line), a terminal escape (a changed window title), a bidirectional override or megabytes of text.
`escaped` and `quoted` make any value one short printable line; every message and report that
quotes such a value goes through them.
"""

from __future__ import annotations

import reprlib

QUOTE_LIMIT = 80  # characters of a quoted value kept in a message
_ELLIPSIS = "..."

# Bounded repr of containers: a YAML alias bomb or a 5000-deep list is summarised, never expanded.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel = 3
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = 6
_BOUNDED.maxstring = _BOUNDED.maxother = _BOUNDED.maxlong = QUOTE_LIMIT


def _escape_char(char: str) -> str:
    return char if char.isprintable() else repr(char)[1:-1]  # \n, \x1b, \u202e as Python writes them


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - len(_ELLIPSIS), 0)] + _ELLIPSIS


def escaped(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as printable text of at most `limit` characters: control, format and other
    non-printable characters written as `\\xNN` / `\\uNNNN` escapes, the rest cut with '...'.

    A string is shown without quotes; anything else as a bounded repr.
    """
    text = value if isinstance(value, str) else _BOUNDED.repr(value)
    out = []
    size = 0
    for char in text[: limit + 1]:  # never walk a 200 MB string: only what can be shown
        piece = _escape_char(char)
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    return _cut("".join(out), limit)


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` quoted for a message: a string in quotes, escaped and cut; anything else as `escaped`."""
    if isinstance(value, str):
        return "'" + escaped(value, max(limit - 2, 1)).replace("'", "\\'") + "'"
    return escaped(value, limit)


def plain_or_quoted(name: str, limit: int = QUOTE_LIMIT) -> str:
    """A name read from a file: as it is when plain (printable, no white space, short), else quoted."""
    plain = isinstance(name, str) and name.isprintable() and not any(c.isspace() for c in name) and len(name) <= limit
    return name if plain else quoted(name, limit)
