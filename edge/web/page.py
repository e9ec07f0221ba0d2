"""The live page: `/` and its script and style, a fixed table of files inside the package
(edge/web/assets/), read once. No path of a request is ever mapped onto the disk: a name
that is not in the table is a 404 like any unknown path.

The page is plain HTML, JavaScript and CSS, with nothing from elsewhere (a device is often
offline); its Content-Security-Policy lets it load nothing but its own files and the API.
"""

import html
import os
import re
import threading
from urllib.parse import quote

from edge.web.server import ApiError, Route

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# URL path -> (file in FOLDER, Content-Type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/assets/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/assets/app.css": ("app.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",       # a ?token= in the page's URL goes nowhere else
    "X-Frame-Options": "DENY",
}

_cache = {}
_lock = threading.Lock()


def _read(path):
    """The bytes of one of the table's files, read on first use; 500 naming the file and the
    fix when the installation lacks it."""
    name, _ = ASSETS[path]
    with _lock:
        data = _cache.get(name)
        if data is None:
            try:
                with open(os.path.join(FOLDER, name), "rb") as f:
                    data = _cache[name] = f.read()
            except OSError as e:
                raise ApiError(500, "the page's file {} cannot be read ({}); reinstall edge "
                                    "(pip install '.[daemon]' ships it)".format(
                                        os.path.join(FOLDER, name), e.strerror or e))
    return data


def _server(path):
    def serve(request):
        data = _read(path)
        if path == "/":
            # the page's own files need the token too: a browser sends it as ?token= (the
            # client proved it knows it; it is the server's, never text from the request)
            token = request.server.token
            query = "?token=" + quote(token.decode("utf-8"), safe="") if token else ""
            data = data.replace(b"{{query}}", html.escape(query).encode("utf-8"))
        request.send_body(200, ASSETS[path][1], data, HEADERS)
    return serve


def routes():
    """A Route per file of the table (GET only)."""
    return [Route(re.escape(path), GET=_server(path)) for path in ASSETS]
