"""URLs as people may see them: logs, health reports, error messages."""

from urllib.parse import urlsplit


def redact(url):
    """The URL with its password replaced by *** (a camera's or a broker's)."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return url.replace(":" + parts.password + "@", ":***@", 1)
    except ValueError:
        pass
    return url
