"""The web port (`edge run --web-port PORT`, config `web`): the live page (each camera's
picture with its detections, zones and lines, the device's health, a zone and line editor)
and the HTTP API under it, to list the cameras and to read and replace each camera's zones
and lines while the daemon runs (docs/web.md).

Its own daemon threads serve it ("web" accepts, "web-client" per connection, at most
web.max_clients at once; a live picture gives its client slot back and counts against
web.max_viewers instead): a request reads the pipeline's snapshot and hands new zones over to
the tracker, which takes them at its next frame, so no client ever holds up a frame.
Nothing is imported unless web.port is set.

Modules: edge.web.server (the bounded server, tokens, JSON), edge.web.api (the routes),
edge.web.page (the page's files: a fixed table of names, never a path from the request
mapped onto the disk), edge.web.stream (the live pictures: MJPEG, encoded only while
watched).
"""

import logging
import threading

from edge.errors import ConfigError

logger = logging.getLogger(__name__)


def read_token(web):
    """The token as bytes (web.token, or the first line of web.token_file), None when none
    is set; ConfigError naming the file and the fix when it cannot be used."""
    from edge.config import MAKE_TOKEN, MIN_TOKEN
    if web["token"] is not None:
        return web["token"].strip().encode("utf-8")
    path = web["token_file"]
    if not path:
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("web.token_file {}: cannot read it ({}); give a file readable by "
                          "the service whose first line is the token".format(
                              path, getattr(e, "strerror", None) or e))
    if len(token) < MIN_TOKEN:
        raise ConfigError("web.token_file {}: its first line must be a token of at least {} "
                          "characters (e.g. from {})".format(path, MIN_TOKEN, MAKE_TOKEN))
    return token.encode("utf-8")


class WebServer:
    """The web port of one daemon (`app`: edge.daemon.Daemon), in threads of its own."""

    def __init__(self, app, web):
        from edge.web.api import Api
        from edge.web.server import BoundedServer
        from edge.web.stream import Streams
        token = read_token(web)
        self.streams = Streams(app, web["max_viewers"], web["max_fps"])
        self.api = Api(app, lambda: self.server.figures(), self.streams)
        try:
            self.server = BoundedServer((web["bind"], web["port"]), self.api.routes(), token,
                                        web["max_clients"], web["timeout"])
        except OSError as e:
            raise ConfigError("web: cannot listen on {}:{} ({}); choose another web.port "
                              "(--web-port) or web.bind".format(web["bind"], web["port"],
                                                                e.strerror or e))
        self.address = "{}:{}".format(web["bind"], self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="web",
                                       daemon=True)

    def start(self):
        self.thread.start()
        logger.info("web: the live page on http://%s/%s", self.address,
                    "" if self.server.token is None else " (token required)")
        return self

    def stop(self):
        """Stop serving at once: connections still open are cut, not waited for."""
        self.streams.stop()
        if self.thread.is_alive():      # shutdown() waits for serve_forever, if it ever ran
            self.server.shutdown()
        self.server.server_close()
        self.server.cut_clients()
