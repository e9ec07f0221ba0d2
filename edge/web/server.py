"""The HTTP plumbing of the web port: a bounded threaded server, tokens, JSON in and out.

The standard library's http.server serves it: a device on Python 3.6 (JetPack 4.6) has it
without another dependency, and the API is a few small JSON routes. The server is the one of
/metrics (edge.httpserve: a thread per connection, bounded), except that a connection past
the bound is answered 503 at once rather than kept waiting.
"""

import hmac
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from edge.httpserve import ThreadPerClientServer

logger = logging.getLogger(__name__)

MAX_BODY = 256 * 1024           # bytes of a request body: every zone at the config's limits
                                # fits in a tenth of it
# Connections beyond max_clients are answered 503 by up to this many short-lived threads
# (each reads the request for at most REFUSE_TIMEOUT_S, so the client sees the reply and not a
# reset); past those too, a connection is closed at once. Both are counted as refused.
REFUSERS = 4
REFUSE_TIMEOUT_S = 1.0


class ApiError(Exception):
    """An answer other than 200: its status and its one-line message."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Route:
    """A path pattern (a regular expression, its groups the handler's arguments) and its
    handler per method: handler(request, *groups)."""

    def __init__(self, pattern, **methods):
        self.pattern = re.compile(pattern)
        self.methods = methods


class Handler(BaseHTTPRequestHandler):
    """One connection: the token checked, then the route's handler; every answer JSON."""

    server_version = "edge"
    sys_version = ""                # no Python version in the Server header
    protocol_version = "HTTP/1.0"   # one request per connection: a slot is never held idle

    def setup(self):
        self.timeout = self.server.client_timeout   # per socket operation, both ways
        super().setup()

    def do_GET(self):
        self._dispatch("GET")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method):
        server = self.server
        server.count("requests")
        url = urlsplit(self.path)
        self.query = url.query
        try:
            if not self._authorized():
                server.count("unauthorized")
                raise ApiError(401, "missing or wrong token: send Authorization: Bearer TOKEN "
                                    "(web.token or web.token_file)",
                               {"WWW-Authenticate": 'Bearer realm="edge"'})
            for route in server.routes:
                match = route.pattern.fullmatch(url.path)
                if match is None:
                    continue
                handler = route.methods.get(method)
                if handler is None:
                    raise ApiError(405, "{} takes {}".format(
                        url.path, ", ".join(sorted(route.methods))),
                        {"Allow": ", ".join(sorted(route.methods))})
                handler(self, *match.groups())
                return
            raise ApiError(404, "no such path; the API is under /api/ (docs/web.md)")
        except ApiError as e:
            self.reply(e.status, {"error": e.message}, e.headers)
        except (OSError, socket.timeout):
            raise            # the client went away or stalled: handle_error logs it quietly
        except Exception:   # a bug: this request fails, not the daemon
            logger.exception("web: %s %s failed", method, url.path)
            self.reply(500, {"error": "internal error; see the device's log"})

    def _authorized(self):
        token = self.server.token
        if token is None:
            return True
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        else:   # ?token= for a browser's <img> and links, which cannot set a header
            given = (parse_qs(self.query).get("token") or [""])[0]
        # constant time: a wrong guess takes as long whatever its first differing byte
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token)

    def read_json(self, limit=MAX_BODY):
        """The request's body as JSON: 411 without Content-Length, 413 past `limit` (refused
        from the header, unread), 400 for a body that is not UTF-8 JSON."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is needed")
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            raise ApiError(400, "Content-Length must be a number of bytes")
        if size > limit:
            raise ApiError(413, "body of {} bytes; at most {}".format(size, limit))
        data = self.rfile.read(size)
        if len(data) < size:
            raise ApiError(400, "body ended after {} of {} bytes".format(len(data), size))
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8 text")
        except RecursionError:
            raise ApiError(400, "the body is not JSON: nested too deeply")
        except ValueError as e:
            raise ApiError(400, "the body is not JSON: {}".format(e))

    def reply(self, status, doc, headers=None):
        """Answer with a JSON document (one line)."""
        body = (json.dumps(doc, allow_nan=False) + "\n").encode("utf-8")
        self.send_body(status, "application/json", body, headers)

    def send_body(self, status, content_type, body, headers=None):
        """Answer with these bytes."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def query_value(self, name):
        """The last value of a query parameter, None when absent."""
        values = parse_qs(self.query).get(name)
        return values[-1] if values else None

    def send_error(self, code, message=None, explain=None):
        """The base class's own errors (a bad request line, too many headers, an unknown
        method) as JSON too."""
        try:
            self.reply(code, {"error": message or self.responses.get(code, ("error",))[0]})
        except OSError:
            pass

    def log_error(self, format, *args):
        if "timed out" in format:       # handle_one_request's word for web.timeout passing
            self.server.count("timeouts")
        logger.debug("web: %s: %s", self.client_address[0], format % args)

    def log_message(self, format, *args):
        pass        # no access log: a request line may carry ?token=


class BoundedServer(ThreadPerClientServer):
    """The web port's server (edge.httpserve): at most `max_clients` connections at once;
    more are refused with 503 and counted, at once."""

    name = "web"

    def __init__(self, address, routes, token=None, max_clients=8, client_timeout=10.0):
        self.routes = routes
        # connections handed over from a client slot to a long-lived stream (detach): they
        # hold a viewer's place (edge.web.stream), not one of the max_clients slots
        self.viewers = set()
        self.token = token              # bytes, or None: no token asked (loopback only)
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self.refusers = threading.BoundedSemaphore(REFUSERS)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "refused": 0, "unauthorized": 0, "timeouts": 0}
        ThreadPerClientServer.__init__(self, address, Handler, max_clients)

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] += n

    def figures(self):
        """{clients, max_clients, requests, refused, unauthorized, timeouts}."""
        with self.lock:
            counts = dict(self.counts)
        with self.clients_lock:
            counts.update(clients=len(self.clients), max_clients=self.max_clients)
        return counts

    def detach(self, request):
        """Hand a connection from its client slot over to a stream: the slot is free for
        the next request while the stream goes on, on the same thread."""
        with self.clients_lock:
            if request not in self.clients:
                return
            self.clients.discard(request)
            self.viewers.add(request)
        self.slots.release()

    def _served(self, request):
        with self.clients_lock:
            detached = request in self.viewers
            self.viewers.discard(request)
            self.clients.discard(request)
        self.shutdown_request(request)
        if not detached:            # a stream's connection gave its slot back already
            self.slots.release()

    def cut_clients(self):
        """End the connections still open, streams too; their threads then end at once."""
        ThreadPerClientServer.cut_clients(self)
        with self.clients_lock:
            for request in self.viewers:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take_slot(self, request):
        if self.slots.acquire(blocking=False):
            return True
        self._refuse(request)
        return False

    def _refuse(self, request):
        self.count("refused")
        refused = self.counts["refused"]
        if refused == 1 or refused % 100 == 0:
            logger.warning("web: %d clients at once already (web.max_clients); refused %d "
                           "connection(s) so far", self.max_clients, refused)
        if not self.refusers.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self.start_thread(self._busy, request, None, self._refused)

    def _busy(self, request, client_address):
        """Read what the client sends (briefly) and answer 503, so it sees why."""
        try:
            request.settimeout(REFUSE_TIMEOUT_S)
            seen = b""
            while b"\r\n\r\n" not in seen and len(seen) < 16384:
                chunk = request.recv(4096)
                if not chunk:
                    break
                seen += chunk
            body = json.dumps({"error": "busy: {} clients already (web.max_clients); try "
                                        "again later".format(self.max_clients)}).encode()
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                            b"application/json\r\nRetry-After: 1\r\nContent-Length: " +
                            str(len(body) + 1).encode() + b"\r\n\r\n" + body + b"\n")
        except OSError:
            pass
        finally:
            self._refused(request)

    def _refused(self, request):
        self.shutdown_request(request)
        self.refusers.release()
