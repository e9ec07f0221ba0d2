"""The one HTTP server of the device's own ports (/metrics, the web API): the standard
library's HTTPServer with a daemon thread per connection and at most `max_clients` at once.

Like socketserver.ThreadingMixIn with daemon_threads, written out because the mixin bounds
neither its threads nor how long a client holds one, and its bookkeeping differs between the
Pythons a device runs (3.7+ joins its threads on close). What happens to a connection past
the bound is the subclass's `take_slot`: here it waits in the listen backlog.
"""

import logging
import socket
import threading
from http.server import HTTPServer

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 128


class ThreadPerClientServer(HTTPServer):
    """HTTPServer serving each connection on a daemon thread of its own, `max_clients` at
    most; `name` names the threads and the log lines."""

    request_queue_size = LISTEN_BACKLOG
    name = "http"

    def __init__(self, address, handler, max_clients):
        self.slots = threading.BoundedSemaphore(max_clients)
        self.stopping = threading.Event()
        self.clients = set()            # sockets of connections being served
        self.clients_lock = threading.Lock()
        HTTPServer.__init__(self, address, handler)

    def take_slot(self, request):
        """Whether a connection gets a handler: it waits for a free one (further connections
        stay in the listen backlog, so a burst is served in turn); a stop ends the wait."""
        while not self.slots.acquire(timeout=0.1):
            if self.stopping.is_set():
                self.shutdown_request(request)
                return False
        return True

    def process_request(self, request, client_address):
        if not self.take_slot(request):
            return
        with self.clients_lock:
            self.clients.add(request)
        self.start_thread(self._serve, request, client_address, self._served)

    def start_thread(self, target, request, client_address, on_failure):
        """Run target(request, client_address) on a daemon thread; on_failure(request) when
        there is no thread to be had."""
        try:
            threading.Thread(target=target, args=(request, client_address),
                             name=self.name + "-client", daemon=True).start()
        except Exception as e:  # no thread to be had
            logger.warning("%s: no thread to serve a client (%s); connection dropped",
                           self.name, e)
            on_failure(request)

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._served(request)

    def _served(self, request):
        # Out of `clients` before it closes: cut_clients never touches a closed socket.
        with self.clients_lock:
            self.clients.discard(request)
        self.shutdown_request(request)
        self.slots.release()

    def handle_error(self, request, client_address):
        # A client that went away or stalled past its timeout: not worth a traceback.
        logger.debug("%s: connection from %s ended early", self.name, client_address[0],
                     exc_info=True)

    def cut_clients(self):
        """End the connections still open; their threads then end at once."""
        with self.clients_lock:
            for request in self.clients:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:     # the client reset it already
                    pass
