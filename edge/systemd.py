"""The systemd notify protocol (sd_notify(3)) spoken directly on $NOTIFY_SOCKET.

No python-systemd dependency: a notification is one datagram of newline-separated
`NAME=value` assignments sent to the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or a
name in the Linux abstract namespace when it starts with "@"). Outside systemd (no
$NOTIFY_SOCKET) every method is a no-op, so the daemon calls them unconditionally.

How `edge run` uses it (unit: systemd/edge.service, Type=notify, WatchdogSec=30):

    notifier = Notifier.from_environ(unset_environment=True)   # children inherit nothing
    watchdog = Watchdog(notifier, lambda: pipeline.delivered)
    ...build engines: see Watchdog.extend_while_building...
    pipeline.start()
    notifier.ready("running yolox-nano on csi://0")            # the start job completes
    while pipeline.alive():                                    # main loop, every 0.1 s
        watchdog.tick()                                        # WATCHDOG=1 only on progress
    notifier.stopping("stopping: finishing frames in flight")  # on SIGTERM

Sending never raises and never blocks: a lost notification is logged at debug level and the
service behaves as if it had not been sent (systemd's timeouts then decide).
"""

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends READY=1, STATUS=, WATCHDOG=1, STOPPING=1, ... to the service manager."""

    def __init__(self, address=None, watchdog_usec=None):
        """`address`: $NOTIFY_SOCKET as systemd sets it ("/run/systemd/notify", "@name");
        None disables every message. `watchdog_usec`: the watchdog timeout in microseconds
        when this process must feed it, else None."""
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._target = _socket_address(address) if address else None
        self._sock = None
        if self._target is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)   # a full queue drops the message, never waits
            except OSError as e:
                logger.debug("systemd notify: cannot create a socket: %s", e)
                self._sock = None

    @classmethod
    def from_environ(cls, environ=None, unset_environment=False):
        """A notifier for $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        The watchdog is this process's to feed only when $WATCHDOG_PID is unset or is our
        pid (an inherited environment must not make a child ping). With
        `unset_environment`, the three variables are removed from `environ` (default
        os.environ) so that child processes (the engine build) do not inherit them.
        """
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        usec = _positive_int(environ.get("WATCHDOG_USEC"))
        pid = environ.get("WATCHDOG_PID")
        if usec is not None and pid and _positive_int(pid) != os.getpid():
            usec = None
        if unset_environment:
            for name in _ENVIRONMENT:
                environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self):
        """True when running under a service manager that listens for notifications."""
        return self._sock is not None

    @property
    def watchdog_interval(self):
        """Seconds between keep-alive pings (half of $WATCHDOG_USEC), None without watchdog."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, *assignments):
        """Send `NAME=value` assignments as one datagram; False when not sent."""
        if self._sock is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            self._sock.sendto(message, self._target)
        except OSError as e:     # no listener, queue full (EAGAIN), socket gone, ...
            logger.debug("systemd notify %s: %s", self.address, e)
            return False
        return True

    def ready(self, status=None):
        """Start-up (or a reload) is complete: the start job ends, the watchdog is armed."""
        return self.notify("READY=1", *_status(status))

    def status(self, text):
        """One line shown by `systemctl status edge`."""
        return self.notify(*_status(text))

    def watchdog(self):
        """One keep-alive ping (WATCHDOG=1); not sent when the watchdog is not ours."""
        if self.watchdog_interval is None:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status=None):
        """The service is shutting down (sent when SIGTERM arrives)."""
        return self.notify("STOPPING=1", *_status(status))

    def extend_timeout(self, seconds):
        """EXTEND_TIMEOUT_USEC=: the current start, run or stop phase may take `seconds` more.

        Each message gives `seconds` from now; only beyond TimeoutStartSec= /
        TimeoutStopSec= does a missing next message fail the unit, so send again before
        `seconds` run out for as long as the work lasts (the first message must arrive
        before TimeoutStartSec= is exceeded). See Watchdog.extend_while_building.
        """
        return self.notify("EXTEND_TIMEOUT_USEC={:d}".format(max(0, int(seconds * 1e6))))

    def reloading(self, status=None):
        """A reload (SIGHUP) begins; send ready() when it is done.

        MONOTONIC_USEC= (CLOCK_MONOTONIC now, in microseconds) goes in the same datagram:
        systemd 253+ needs it for Type=notify-reload, older versions ignore it.
        """
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.notify("RELOADING=1", "MONOTONIC_USEC={:d}".format(usec), *_status(status))

    def close(self):
        """Close the socket; later messages are dropped."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Watchdog:
    """Feeds the systemd watchdog only while `progress()` advances.

    `progress()` returns a count that grows while the service does useful work: frames
    processed in normal running, build steps while an engine builds. `tick(now)` may be
    called as often as the caller likes (the daemon's 0.1 s main loop): it pings at most
    once per `notifier.watchdog_interval` (half of WatchdogSec=), and only if the count
    moved since the previous ping. A stalled pipeline therefore stops the pings, and after
    WatchdogSec= systemd aborts the service and Restart=on-failure starts it again.

    extend_while_building: an engine build takes minutes on a Nano (longer than
    TimeoutStartSec=120 on a first boot) and processes no frames. While it runs the daemon
    switches the watchdog to the build's progress and keeps the start (or stop) job alive:

        watchdog.follow(build.progress)          # e.g. steps or heartbeats of the child
        while build.running():
            watchdog.extend_while_building(60)   # EXTEND_TIMEOUT_USEC=60000000, every 30 s
            watchdog.tick()                      # WATCHDOG=1 from build progress (after READY)
            stop_event.wait(1.0)
        watchdog.follow(lambda: pipeline.delivered)

    Before READY=1 systemd ignores WATCHDOG=1 (the watchdog is not armed yet) and the
    extensions are what count; after READY=1 (an engine rebuilt at run time) the pings count.
    A build whose progress stops gets neither, so systemd ends a hung build as well.
    """

    def __init__(self, notifier, progress, interval=None):
        """`interval`: seconds between pings; default notifier.watchdog_interval."""
        self.notifier = notifier
        self.interval = notifier.watchdog_interval if interval is None else interval
        self.pings = 0
        self.extensions = 0
        self._progress = progress
        self._ping_count = progress()       # count at the last ping (or at the start)
        self._ping_time = None
        self._extend_count = None           # count at the last extension
        self._extend_time = None

    def follow(self, progress):
        """Count progress with another callable from now on (frames <-> build)."""
        self._progress = progress
        self._ping_count = progress()
        self._extend_count = None
        self._extend_time = None

    def tick(self, now=None):
        """Send WATCHDOG=1 if the interval has passed and progress advanced; True if sent."""
        if self.interval is None:
            return False
        now = time.monotonic() if now is None else now
        if self._ping_time is not None and now - self._ping_time < self.interval:
            return False
        count = self._progress()
        if count <= self._ping_count:
            return False                    # stalled: let the watchdog run out
        self._ping_count = count
        self._ping_time = now
        self.pings += 1
        self.notifier.watchdog()
        return True

    def extend_while_building(self, seconds, now=None):
        """EXTEND_TIMEOUT_USEC=`seconds` every `seconds` / 2 while progress advances.

        The first call of a build always extends (the build just started, and the message
        must reach systemd before TimeoutStartSec= is exceeded); later ones only when the
        count moved since the previous extension. True if sent.
        """
        if not self.notifier.enabled:
            return False
        now = time.monotonic() if now is None else now
        count = self._progress()
        if self._extend_time is not None:
            if now - self._extend_time < seconds / 2.0 or count <= self._extend_count:
                return False
        self._extend_count = count
        self._extend_time = now
        self.extensions += 1
        self.notifier.extend_timeout(seconds)
        return True


def _socket_address(address):
    """The sendto() address for $NOTIFY_SOCKET, or None when it is not an AF_UNIX one."""
    if address.startswith("@"):
        return "\0" + address[1:]           # Linux abstract namespace
    if address.startswith("/"):
        return address
    logger.debug("systemd notify: unsupported NOTIFY_SOCKET %r (not a path or @name)", address)
    return None


def _positive_int(text):
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _status(text):
    """STATUS= as a list of 0 or 1 assignment; the protocol is line based."""
    if text is None:
        return []
    return ["STATUS=" + " ".join(str(text).splitlines())]
