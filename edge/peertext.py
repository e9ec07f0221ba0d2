"""What a peer sent, made safe to print: a device's labels, names, reasons and times are data.

`edge listen` and `edge health` print strings that other machines chose (a device id from a
topic, labels, file names, zone names, reasons, states). Printed raw, an escape code would
drive the operator's terminal, a newline would forge a line of another device, a bidi
override would reverse what a line says, and a 1 MB string would flood the screen. Every
such string goes through `text()` before it is printed; times through `when()`.
"""

import time
import unicodedata

LIMIT = 200                 # characters of a peer's string printed, before " ... (N characters)"
# Unicode categories escaped besides C0/C1: format characters (bidi overrides, zero-width,
# tags), surrogates (unprintable: a lone one would end a UTF-8 stdout), private use,
# line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
LATEST = 1e10               # unix s (year 2286): later times are no device's clock


def _escaped(char):
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x20 or 0x7f <= code < 0xa0:
        return "\\x{:02x}".format(code)
    if code < 0xa0 or unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    return "\\u{:04x}".format(code) if code <= 0xffff else "\\U{:08x}".format(code)


def text(value, limit=LIMIT):
    """A peer's value as one printable line: control, format and separator characters
    escaped (`\\x1b`, `\\n`, `\\u202e`), a backslash doubled, at most `limit` characters of
    it (then ` ... (N characters)`). Not a string: its str(), treated the same."""
    if not isinstance(value, str):
        value = str(value) if isinstance(value, (int, float, type(None))) else repr(value)
    out = []
    length = 0
    for char in value[:limit]:
        piece = _escaped(char)
        out.append(piece)
        length += len(piece)
        if length >= limit:
            break
    shown = "".join(out)
    if len(out) < len(value):
        shown += " ... ({} characters)".format(len(value))
    return shown


def when(ts):
    """A peer's unix time as local `YYYY-mm-dd HH:MM:SS`; `an unknown time` for anything
    that is not a finite number of seconds from 1970 to year 2286."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts <= LATEST:
        return "an unknown time"        # (NaN fails the comparison too)
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, ValueError, OSError):
        return "an unknown time"
