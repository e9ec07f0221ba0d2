"""URLs as people may see them: logs, health reports, error messages."""

import re
from urllib.parse import urlsplit

# scheme://user:password@ up to the last "@": a URL too malformed to parse may still hold a
# password, and hiding a little too much is better than showing it
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):(.*)@", re.S)


def redact(url):
    """The URL with its password replaced by *** (a camera's or a broker's)."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return url.replace(":" + parts.password + "@", ":***@", 1)
        return url
    except ValueError:       # malformed (a bad IPv6 host, ...): redact by pattern instead
        return _USERINFO.sub(r"\1:***@", url, count=1)
