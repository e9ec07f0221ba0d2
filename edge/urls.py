"""URLs as people may see them: logs, health reports, status, error messages.

A password may hold any character, and people write them into URLs unencoded:
`rtsp://admin:se/cret@host/stream`. Parsers that end the authority at the first `/`, `?` or
`#` (urllib, FFmpeg) then never see a userinfo, and a redaction built on them shows the
password. Here the userinfo of a URL is everything between `scheme://` and the last `@` of
that URL, however the rest is malformed; its user name (up to the first `:`) is kept, the
rest becomes `***`. Hiding a little too much (a URL without credentials that has an `@` in
its path or query shows `***@` up to it) is better than showing a password.
"""

import re
from urllib.parse import quote, unquote

# A percent-escape of a character, escaped again any number of times (%40, %2540, ...): a
# URI inside another's query is percent-encoded (stereo://?left=rtsp%3A%2F%2Fu%3Ap%40h).
_ENC = r"%(?:25)*"
# `scheme://` or its percent-encoded forms, not inside another URL's userinfo or path: what
# precedes it is the start of the text or a separator (space, quote, =, &, comma, ...).
_START = re.compile(r"(?<![A-Za-z0-9+.\-:/@%])[A-Za-z][A-Za-z0-9+.\-]*"
                    r"(?::|" + _ENC + r"3[Aa])(?://|(?:" + _ENC + r"2[Ff]){2})")
_AT = re.compile(r"@|" + _ENC + r"40")
_COLON = re.compile(r":|" + _ENC + r"3[Aa]")
# The authority is empty (file:///x, stereo://?left=...): nothing to hide.
_EMPTY = re.compile(r"[/?#]|" + _ENC + r"(?:2[Ff]|3[Ff]|23)")
_MASK = "***"
# The form of a URL with credentials as messages and documents write it: no secret.
_TEMPLATE = "[user[:password]"


def _spans(text):
    """(start, end) of the userinfo of every URL in `text` (end: its last `@`)."""
    starts = list(_START.finditer(text))
    spans = []
    for i, match in enumerate(starts):
        begin = match.end()
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        newline = text.find("\n", begin, end)
        if newline >= 0:
            end = newline
        if _EMPTY.match(text, begin):
            continue
        last = None
        for last in _AT.finditer(text, begin, end):
            pass
        if last is not None and text[begin:last.start()] != _TEMPLATE:
            spans.append((begin, last.start()))
    return spans


def _masked(userinfo):
    """`user:***` (the user name is no secret and helps to check credentials), or `***`."""
    colon = _COLON.search(userinfo)
    return _MASK if colon is None else userinfo[:colon.end()] + _MASK


def userinfo(url):
    """The userinfo of one URL as written (`user:password`), or None: everything between
    `scheme://` and the last `@` of the URL."""
    start = _START.match(url)
    if start is None or _EMPTY.match(url, start.end()):
        return None
    last = None
    for last in _AT.finditer(url, start.end()):
        pass
    return None if last is None else url[start.end():last.start()]


def split(url):
    """(`scheme://`, userinfo or None, the rest: host, port, path, query) of one URL;
    (None, None, url) for text that does not start with `scheme://`."""
    start = _START.match(url)
    if start is None:
        return None, None, url
    info = userinfo(url)
    rest = url[start.end():]
    if info is not None:
        rest = rest[len(info):]
        rest = rest[_AT.match(rest).end():]
    return url[:start.end()], info, rest


def redact(text, *urls):
    """`text` (a URL, or a message that may quote URLs) with every URL's userinfo reduced to
    `user:***` (or `***`): a camera's or a broker's password is never shown.

    `urls`: URLs the text may quote in pieces (an exception about one, a path made from one):
    their passwords, as written, percent-decoded and percent-encoded, are hidden wherever
    they appear.
    """
    if not isinstance(text, str):
        text = str(text)
    for url in urls:
        info = userinfo(url) if isinstance(url, str) else None
        if not info:
            continue
        colon = _COLON.search(info)
        secrets = {info}
        if colon is not None:
            password = info[colon.end():]
            secrets.update((password, unquote(password), quote(unquote(password), safe="")))
        for secret in sorted((s for s in secrets if len(s) >= 3 or s == info), key=len,
                             reverse=True):
            text = text.replace(secret, _masked(secret) if secret == info else _MASK)
    parts = []
    last = 0
    for begin, end in _spans(text):
        parts.append(text[last:begin])
        parts.append(_masked(text[begin:end]))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def redacted(value, *urls):
    """A JSON-like value (a health report) with `redact` applied to every string in it."""
    if isinstance(value, str):
        return redact(value, *urls)
    if isinstance(value, dict):
        return {key: redacted(item, *urls) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(item, *urls) for item in value]
    return value
