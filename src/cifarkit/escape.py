"""How names from data (file names, class names) are written into text: one reversible escaping.

File names on POSIX are bytes; Python decodes them with surrogateescape (PEP 383), so a byte that is not
UTF-8 arrives as a lone surrogate U+DC80..U+DCFF. Written raw, such names break UTF-8 files, and a name with
a newline, a carriage return or an escape sequence breaks a table or reaches the terminal. The rule, for the
text formats (table, csv) and every message printed:

    \\          a backslash (doubled, so that escapes are unambiguous)
    \\n \\r \\t   newline, carriage return, tab
    \\xNN       a byte that is not UTF-8 (NN: its hex value)
    \\uNNNN     any other character that is not printable (C0/C1 controls, DEL, bidi and other format
               characters, line separators, unassigned code points); \\UNNNNNNNN above U+FFFF

Every other character is written as itself, in UTF-8. `unescape_name` inverts it exactly, so every name a
filesystem allows round-trips (`os.fsencode(unescape_name(text))` gives the original bytes). JSON output
keeps JSON's own escaping (`json_line`): a name is a JSON string whose value is the decoded name itself,
with non-UTF-8 bytes as \\udcNN escapes and no raw non-printable character in the text.

    escape_name("photos/a\\rb.jpg")   # 'photos/a\\\\rb.jpg' (printed: photos/a\\rb.jpg)
"""

from __future__ import annotations

import json
import re
from typing import Any

_SIMPLE = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL)


def _escape_char(ch: str) -> str:
    if ch in _SIMPLE:
        return _SIMPLE[ch]
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as surrogateescape carries it
        return f"\\x{o - 0xDC00:02x}"
    if ch.isprintable():
        return ch
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def escape_name(text: str) -> str:
    """`text` with every character outside the printable, valid-UTF-8 set escaped (see the module docs)."""
    if text.isprintable() and "\\" not in text:  # the common case, at C speed
        return text
    return "".join(_escape_char(ch) for ch in text)


def unescape_name(text: str) -> str:
    """The inverse of escape_name."""

    def one(m: re.Match[str]) -> str:
        byte, u4, u8, other = m.groups()
        if byte is not None:
            return chr(0xDC00 + int(byte, 16))  # back to the surrogate that os.fsencode turns into the byte
        if u4 is not None or u8 is not None:
            return chr(int(u4 or u8, 16))
        return {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}.get(other, "\\" + other)

    return _UNESCAPE.sub(one, text) if "\\" in text else text


def json_line(obj: Any) -> str:
    """json.dumps for output rows: UTF-8 text, NaN refused (bare NaN is not JSON), and no raw non-printable
    character: JSON already escapes C0 controls; the others (C1, bidi controls, lone surrogates from
    non-UTF-8 file names) become \\uNNNN escapes, which every JSON parser decodes to the same string."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text if text.isprintable() else "".join(_json_char(ch) for ch in text)


def _json_char(ch: str) -> str:
    if ch.isprintable():
        return ch
    o = ord(ch)
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    o -= 0x10000  # JSON escapes code points above U+FFFF as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"
