"""MQTT: broker URLs, one paho client that works with paho-mqtt 1.x and 2.x, the status topic.

paho's network thread runs the socket; our callbacks only set flags and never raise, since an
exception escaping a callback ends that thread and every later reconnect with it.
"""

import collections
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import parse_qsl, unquote, urlsplit

from edge import topics, urls
from edge.errors import ConfigError
from edge.urls import redact

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Commands every device also takes on `{prefix}/_all/cmd/{name}`: one request reaches a whole
# fleet (`edge health --all`). Only those that read and change nothing.
BROADCAST_LEVEL = topics.BROADCAST_LEVEL
BROADCAST_COMMANDS = ("health", "ping")
# Bytes of an MQTT packet around a request's payload (topic, properties, header): the daemon
# keeps no more than commands.max_bytes plus this of any message it is sent (`make_client`).
PACKET_HEADROOM = 8192
# Bytes read from the socket at a time while the rest of an oversized message is dropped.
DROP_CHUNK = 65536
# Seconds between the reminders that the broker is still unreachable (each new cause of
# failure is logged at once).
REMIND_S = 300.0


def parse_url(url, qos=0, keepalive=30):
    """Broker settings from `mqtt[s]://[user[:password]@]host[:port][?qos=0|1&keepalive=S]`.

    The userinfo ends at the URL's last `@` (edge.urls.split), so a password may hold any
    character, `/ ? # @ :` included, written as it is or percent-encoded (%2F for /); only
    the rest of the URL goes through urllib, whose errors therefore never quote the password.
    """
    shown = redact(url, url)

    def bad(reason):
        return ConfigError("mqtt url {!r}: {}; expected mqtt://[user[:password]@]host[:port]"
                           "[?qos=0|1&keepalive=S] or mqtts://...{}".format(
                               shown, reason, _PASSWORD_HINT if password else ""))
    head, userinfo, rest = urls.split(url)
    user, _, password = (userinfo or "").partition(":")
    try:
        parts = urlsplit(url if head is None else head + rest)
        port = parts.port
    except ValueError as e:
        raise bad(str(e))
    if parts.scheme not in DEFAULT_PORTS:
        raise bad("unknown scheme {!r}".format(parts.scheme))
    if not parts.hostname:
        raise bad("no host")
    if parts.path not in ("", "/"):
        raise bad("unexpected path {!r}".format(parts.path))
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key in query:
        if key not in ("qos", "keepalive"):
            raise bad("unknown parameter {!r}".format(key))
    try:
        qos = int(query.get("qos", qos))
        keepalive = int(query.get("keepalive", keepalive))
    except ValueError:
        raise bad("qos and keepalive must be integers")
    if qos not in (0, 1):
        raise bad("qos must be 0 or 1")
    if not 5 <= keepalive <= 3600:
        raise bad("keepalive must be 5..3600 seconds")
    return {"host": parts.hostname, "port": port or DEFAULT_PORTS[parts.scheme],
            "tls": parts.scheme == "mqtts", "qos": qos, "keepalive": keepalive,
            "username": unquote(user) if user else None,
            "password": unquote(password) if password else None,
            "display": shown}


# Where a password is better kept than in a URL (which `ps`, shell histories and configs
# show), said by every error about a URL that holds one.
_PASSWORD_HINT = "; better keep the password out of the URL: mqtt.password_file " \
                 "(--password-file) or EDGE_MQTT_PASSWORD"


PASSWORD_ENV = "EDGE_MQTT_PASSWORD"


def with_credentials(settings, username=None, password_file=None, ca_file=None,
                     cert_file=None, key_file=None, where="mqtt"):
    """Settings completed with credentials and TLS files; ConfigError for a missing file.

    The password comes from the URL, else `password_file` (first line), else the
    EDGE_MQTT_PASSWORD environment variable: never from a command line (visible to every
    user in `ps`). It is kept only in these settings: never logged, never in health.
    """
    settings = dict(settings)
    if username:
        settings["username"] = username
    if settings["password"] is None and password_file:
        try:
            with open(password_file, "r", encoding="utf-8") as f:
                settings["password"] = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ConfigError("{}.password_file {}: cannot read it ({}); create it readable "
                              "by the edge user only (chmod 600)".format(
                                  where, password_file, e.strerror))
    if settings["password"] is None and os.environ.get(PASSWORD_ENV):
        settings["password"] = os.environ[PASSWORD_ENV]
    for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if path and not os.path.isfile(path):
            raise ConfigError("{}.{} {}: file not found".format(where, key, path))
        settings[key] = path
    if (cert_file is None) != (key_file is None):
        raise ConfigError("{}: cert_file and key_file go together (client certificate and its "
                          "key)".format(where))
    if (ca_file or cert_file) and not settings["tls"]:
        raise ConfigError("{}: TLS files are set but the URL is mqtt://; use mqtts://".format(
            where))
    return settings


def configured(section):
    """Broker settings from the config's `mqtt` section (URL, credentials, TLS files)."""
    return with_credentials(parse_url(section["url"], section["qos"], section["keepalive"]),
                            section["username"], section["password_file"], section["ca_file"],
                            section["cert_file"], section["key_file"])


def secure(client, settings):
    """Apply user name, password and TLS from settings to a paho client."""
    if settings.get("username"):
        client.username_pw_set(settings["username"], settings.get("password"))
    if settings.get("tls"):
        client.tls_set(ca_certs=settings.get("ca_file"), certfile=settings.get("cert_file"),
                       keyfile=settings.get("key_file"))


def make_client(client_id, protocol="3.1.1", clean_session=True, max_packet=None):
    """A paho Client for MQTT 3.1.1 (or 5) under paho-mqtt 1.x or 2.x.

    MQTT 5 takes no clean_session (it has clean start, which paho sets on the first
    connect unless `connect_async(clean_start=False)`); mosquitto 1.4 (Ubuntu 18.04) speaks
    only 3.1.1, hence the default. `clean_session=False`: the broker keeps the client's
    subscriptions and queues its QoS 1 messages while it is away (a persistent session).

    `max_packet` (bytes): a message the broker sends that is larger is read in chunks and
    only its first `max_packet` bytes are kept (`cut_size` tells its real size), so a 250 MB
    message costs no memory; the client's `max_packet` stays None where this paho's
    internals are not the ones the guard knows (then paho buffers every message whole).
    """
    import paho.mqtt.client as paho
    options = {"client_id": client_id}
    if protocol == "5":
        options["protocol"] = paho.MQTTv5
    else:
        options.update(clean_session=clean_session, protocol=paho.MQTTv311)
    cls = paho.Client if max_packet is None else _bounded_class(paho.Client)
    if hasattr(paho, "CallbackAPIVersion"):   # paho-mqtt >= 2.0
        client = cls(paho.CallbackAPIVersion.VERSION2, **options)
    else:
        client = cls(**options)
    if max_packet is not None:
        if _guard_fits(client):
            client.max_packet = max_packet
        else:
            logger.warning("mqtt: paho-mqtt %s reads messages in a way edge does not know: "
                           "a message of any size is held whole in memory before a command "
                           "over commands.max_bytes is refused; cap messages at the broker "
                           "(docs/broker.md, Large messages)", _paho_version())
    return client


# What paho-mqtt 1.5 to 2.2 keep of the packet being read (Client._in_packet; the same keys
# in every release since 1.0) and how they read its body: `_packet_read` calls
# `_sock_recv(to_process)` until `to_process` is 0, subtracting the length of what it gets
# and appending it to `packet` (bytes in 1.5, a bytearray from 1.6), then parses the packet.
# paho has no option to bound that (MQTT 5's Maximum Packet Size only asks the broker).
_GUARD_KEYS = ("command", "have_remaining", "remaining_length", "to_process", "packet")
_PUBLISH = 0x30


def _paho_version():
    try:
        import paho.mqtt
        return getattr(paho.mqtt, "__version__", "?")
    except ImportError:
        return "?"


def _guard_fits(client):
    """Whether this paho reads packets the way the size guard expects (checked, not assumed:
    a paho 3 may read them otherwise)."""
    state = getattr(client, "_in_packet", None)
    major = _paho_version().split(".")[0]
    return major in ("1", "2") and isinstance(state, dict) and \
        all(key in state for key in _GUARD_KEYS) and callable(getattr(client, "_sock_recv", None))


_BOUNDED = {}


def _bounded_class(base):
    """paho's Client class `base` with the size guard (see make_client); made once."""
    if base in _BOUNDED:
        return _BOUNDED[base]

    class BoundedClient(base):
        max_packet = None     # bytes kept of a PUBLISH at most; None: paho as it is
        _cut = None           # paho's record (_in_packet) of the latest PUBLISH cut short

        def _sock_recv(self, bufsize):
            state = self._in_packet
            limit = self.max_packet
            if limit is None or not state["have_remaining"] or \
                    state["command"] & 0xF0 != _PUBLISH or state["remaining_length"] <= limit:
                return super()._sock_recv(bufsize)
            # The body of a PUBLISH over the limit: paho asks for all of it at once (and would
            # allocate that much per call); read it in chunks, keep its first `limit` bytes.
            data = super()._sock_recv(min(bufsize, DROP_CHUNK))
            held = len(state["packet"])
            if not data or held + len(data) <= limit:
                return data
            if held > limit:
                state["packet"] = state["packet"][:limit]     # the byte kept last time
                held = limit
            elif self._cut is not state:
                # The first bytes past the limit: topic, packet id and MQTT 5 properties
                # must be whole in what is kept, or paho could not parse the message.
                header = _publish_header_length(state["command"], bytes(state["packet"]) +
                                                data[:limit - held], self._protocol == 5)
                if header is None or header > limit:
                    logger.warning("mqtt: dropped the connection: the broker sent a message "
                                   "of %d bytes whose header alone is over %d bytes",
                                   state["remaining_length"], limit)
                    # paho 1.5 to 2.x take this for a lost connection and reconnect
                    raise ConnectionError("a message header over {} bytes".format(limit))
                self._cut = state
            # paho subtracts from `to_process` what it is given; the rest is dropped here.
            # It is given one byte at least: an empty read means a closed connection.
            keep = max(1, limit - held)
            state["to_process"] -= len(data) - keep
            return data[:keep]

        def cut_size(self, message):
            """The payload size in bytes of `message` (in on_message) if the guard cut it
            short, else None."""
            state = self._in_packet
            if self._cut is not state:
                return None
            return len(message.payload) + state["remaining_length"] - len(state["packet"])

    _BOUNDED[base] = BoundedClient
    return BoundedClient


def _publish_header_length(command, data, mqtt5):
    """Bytes of a PUBLISH's variable header (topic, packet id, MQTT 5 properties) from the
    first bytes of its body `data`; None when `data` is too short to tell."""
    if len(data) < 2:
        return None
    length = 2 + (data[0] << 8 | data[1])
    if command & 0x06:                  # QoS 1 or 2: a packet identifier
        length += 2
    if not mqtt5:
        return length
    # MQTT 5: the properties' length, a variable byte integer (1 to 4 bytes), then them
    value, shift = 0, 0
    for i in range(length, min(length + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        shift += 7
        if not data[i] & 0x80:
            return i + 1 + value
    return None


def packet_properties(packet, **values):
    """MQTT 5 properties of a packet type (`CONNECT`, `DISCONNECT`, ...) with these values,
    e.g. packet_properties("CONNECT", SessionExpiryInterval=3600)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    properties = Properties(getattr(PacketTypes, packet))
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def reply_properties(correlation):
    """MQTT 5 PUBLISH properties carrying a request's correlation data (None if none)."""
    if correlation is None:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    properties = Properties(PacketTypes.PUBLISH)
    properties.CorrelationData = correlation
    return properties


def _reason_code(rc):
    """An int from a paho 1.x int or a paho 2.x ReasonCode."""
    value = getattr(rc, "value", rc)
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def disconnect_code(args):
    """The reason code of on_disconnect's arguments after (client, userdata): (rc) in paho
    1.x, (rc, properties) in 1.x with MQTT 5, (flags, rc, properties) in 2.x; 0 is a clean
    disconnect."""
    return _reason_code(args[-2] if len(args) >= 2 else args[-1]) if args else 0


def session_present(flags):
    """Whether the broker resumed a persistent session, from on_connect's flags (a dict in
    paho 1.x, ConnectFlags in 2.x)."""
    if isinstance(flags, dict):
        return bool(flags.get("session present"))
    return bool(getattr(flags, "session_present", False))


def diagnose(settings, timeout=3.0):
    """Why the broker in `settings` cannot be reached, naming the cause (DNS, refused,
    timeout, TLS verification, ...); None when a TCP (and TLS) connection works now."""
    import ssl
    host, port = settings["host"], settings["port"]
    where = "{}:{}".format(host, port)
    try:
        socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return "DNS: cannot resolve {} ({}); check the host name in the URL".format(
            host, e.strerror or e)
    try:
        sock = socket.create_connection((host, port), timeout)
    except ConnectionRefusedError:
        return "connection refused by {}: no broker listens there; check the port and that " \
               "the broker runs".format(where)
    except socket.timeout:
        return "no answer from {} within {:.0f} s: a firewall, or the wrong host".format(
            where, timeout)
    except OSError as e:
        return "cannot connect to {} ({})".format(where, e.strerror or e)
    try:
        if not settings.get("tls"):
            return None
        context = ssl.create_default_context(cafile=settings.get("ca_file"))
        if settings.get("cert_file"):
            context.load_cert_chain(settings["cert_file"], settings.get("key_file"))
        sock.settimeout(timeout)
        try:
            context.wrap_socket(sock, server_hostname=host).close()
        except (ssl.SSLError, ssl.CertificateError) as e:
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text or "match" in text or \
                    isinstance(e, ssl.CertificateError):
                return "TLS: the broker's certificate does not verify ({}); check mqtt.ca_file " \
                       "and that the URL's host is the name in the certificate".format(text)
            return "TLS handshake with {} failed ({})".format(where, text)
        except socket.timeout:
            return "TLS handshake with {} timed out".format(where)
        except OSError as e:
            return "TLS handshake with {} failed ({})".format(where, e.strerror or e)
        return None
    finally:
        sock.close()


def probe(settings, protocol="3.1.1", timeout=5.0, client_id=None):
    """Connect once as an MQTT client (CONNECT, CONNACK); None when the broker accepts,
    else why not (see `diagnose`, or the broker's refusal: credentials, authorisation).

    With a `client_id` the clean-session connect also ends that client's persistent
    session on the broker (its subscriptions and queued messages)."""
    connack = []
    answered = threading.Event()
    client = make_client(client_id or "edge-probe-{}".format(int(time.time() * 1000) % 100000),
                         protocol)
    secure(client, settings)

    def on_connect(client, userdata, flags, rc, properties=None):
        connack.append(_reason_code(rc))
        answered.set()
    client.on_connect = on_connect
    try:
        client.connect(settings["host"], settings["port"], settings["keepalive"])
    except (OSError, ValueError) as e:
        return diagnose(settings, timeout) or "cannot connect ({})".format(e)
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return "no answer to CONNECT within {:.0f} s: is it an MQTT broker?".format(timeout)
        if connack[0] != 0:
            return "broker refused the connection (code {}: {})".format(
                connack[0], _connack_text(connack[0]))
        return None
    finally:
        client.disconnect()
        client.loop_stop()


# The reason of the last will, and only of it: how readers tell a will from a goodbye.
WILL_REASON = "connection lost"


def status_payload(device, state, since, reason=None):
    """The `status` message (retained; also the last will). A reason quoting a URL (the
    error a daemon ended with) never shows its password."""
    from edge import __version__
    return json.dumps({"v": 1, "device": device, "state": state, "since": round(since, 3),
                       "reason": None if reason is None else redact(reason),
                       "version": __version__},
                      separators=(",", ":")).encode()


def is_last_will(status):
    """Whether a status payload (a dict) is a last will: `offline` with WILL_REASON. Its
    `since` says nothing about the death: it is the time the connection began."""
    return isinstance(status, dict) and status.get("state") == "offline" and \
        status.get("reason") == WILL_REASON


LinkView = collections.namedtuple("LinkView", "connected connects error")
LinkView.__doc__ = """The connection for observers: up now, connections made, and the last
error while down (None while up)."""


class MqttLink:
    """A connection to the broker kept up in the background, with status and last will."""

    def __init__(self, settings, device, prefix="edge", queue_limit=1000, protocol="3.1.1",
                 max_packet=None):
        self.settings = settings
        # Bytes kept of any message the broker sends (the size guard of make_client): a
        # 250 MB command is read in chunks and refused, never held whole.
        self.max_packet = max_packet
        self.device = device
        self.prefix = prefix
        self.connected = threading.Event()
        self.last_error = None
        self.connects = 0
        self.state = "starting"
        self.since = time.time()
        self.reason = None
        self.protocol = protocol
        self.failures = 0         # connection attempts failed since the broker was last up
        self._outage = None       # monotonic s of the first failure of this outage
        self._causes = set()      # causes logged in this outage (each once)
        self._reminded = 0.0
        self.remind_s = REMIND_S
        self._answered = False    # the broker answered this connection's CONNECT
        client = make_client("edge-{}-{}".format(device, int(time.time() * 1000) % 100000),
                             protocol, max_packet=max_packet)
        client.max_queued_messages_set(queue_limit)
        secure(client, settings)
        # The will's `since` is the connect time (a number: robots' clients of every version
        # validate it so); it cannot know when the broker will publish it, so readers take
        # the time of death from the last retained report (`health` ts) instead.
        client.will_set(self.topic("status"), status_payload(
            device, "offline", self.since, WILL_REASON), qos=1, retain=True)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail    # paho >= 1.6; ignored before
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client
        # callable(name, payload bytes, response topic, correlation data, broadcast), set by
        # the daemon; response topic and correlation data come from MQTT 5 requests, else
        # None; broadcast: the request came on {prefix}/_all/cmd/ (the whole fleet's)
        self.on_command = None
        # callable(camera or None, payload bytes, retained, size=...) for the `motion`
        # topics (edge.motioninput), set by the daemon; called in paho's thread
        self.on_motion = None
        self.on_change = None     # callable() when the broker is lost or back (health)

    def snapshot(self):
        """A LinkView of this moment."""
        connected = self.connected.is_set()
        return LinkView(connected, self.connects, None if connected else self.last_error)

    def topic(self, suffix):
        return topics.device_topic(self.prefix, self.device, suffix)

    def broadcast_topic(self, name):
        """The topic a fleet-wide command `name` arrives on."""
        return topics.broadcast_topic(self.prefix, name)

    def start(self):
        """Begin connecting in the background; never blocks on the network."""
        options = {}
        if self.protocol == "5" and self.max_packet and self.client.max_packet is None:
            # Only where the size guard cannot work (an unknown paho): asking the broker for
            # no larger packet costs the command channel on Mosquitto 2.0, which stops
            # sending this session QoS 1 messages after max_inflight_messages (20) refused
            # ones (docs/broker.md, Large messages).
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            options["properties"] = Properties(PacketTypes.CONNECT)
            options["properties"].MaximumPacketSize = self.max_packet
        try:
            self.client.connect_async(self.settings["host"], self.settings["port"],
                                      self.settings["keepalive"], **options)
        except (OSError, ValueError) as e:
            self.last_error = redact(str(e))
        self.client.loop_start()

    def set_status(self, state, reason=None):
        """Publish the retained status now (when connected) and after every reconnect."""
        if state != self.state or reason != self.reason:
            self.state, self.reason, self.since = state, reason, time.time()
        if not self.connected.is_set():
            return None     # _on_connect publishes it
        return self.publish(self.topic("status"), status_payload(
            self.device, self.state, self.since, self.reason), 1, retain=True)

    def publish(self, topic, payload, qos, retain=False, properties=None):
        """paho's MessageInfo; its rc says whether paho took the message (see `taken`), and
        `delivered` whether it left."""
        if properties is not None and self.protocol == "5":
            info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                       properties=properties)
        else:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == _NO_CONN:
            # paho keeps a QoS 1 message it could not send and sends it after the reconnect,
            # but its rc stays "no connection": is_published() (paho 1.x and 2.x) would
            # raise on it for good, even once the broker acknowledged it.
            info.rc = _OK
        return info

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        try:
            self._answered = True
            code = _reason_code(rc)
            if code != 0:
                self._down("broker refused the connection (code {}: {}); check mqtt.username "
                           "and the password".format(code, _connack_text(code)), attempt=True)
                return
            self.connects += 1
            recovered, self.last_error = self.last_error is not None, None
            if self._outage is None:
                logger.info("mqtt connected to %s", self.settings["display"])
            else:
                logger.info("mqtt connected to %s after %s down (%d failed attempts)",
                            self.settings["display"],
                            _duration(time.monotonic() - self._outage), self.failures)
            self._outage, self._causes, self.failures = None, set(), 0
            self.connected.set()
            if recovered:
                self._changed()
            self.set_status(self.state, self.reason)
            # Subscribed on every connect: a clean session forgets subscriptions.
            topics = []
            if self.on_command is not None:
                topics += [(self.topic("cmd/+"), 1)] + \
                    [(self.broadcast_topic(n), 1) for n in BROADCAST_COMMANDS]
            if self.on_motion is not None:
                # QoS 0: only the newest rotation counts, none is worth a retransmission
                topics += [(self.topic("motion"), 0), (self.topic("motion/+"), 0)]
            if topics:
                client.subscribe(topics)
        except Exception:  # never let an exception end paho's network thread
            logger.exception("mqtt on_connect failed")

    def _on_message(self, client, userdata, message):
        try:
            motion = self.topic("motion")
            if self.on_motion is not None and message.topic.startswith(motion) and \
                    message.topic[len(motion):len(motion) + 1] in ("", "/"):
                cut_size = getattr(client, "cut_size", None)
                self.on_motion(None if message.topic == motion else
                               message.topic[len(motion) + 1:], message.payload,
                               bool(message.retain),
                               size=cut_size(message) if cut_size is not None else None)
                return
            prefix = self.topic("cmd/")
            broadcast = message.topic.startswith(self.broadcast_topic(""))
            if broadcast:
                prefix = self.broadcast_topic("")
            if message.retain and message.topic.startswith(prefix):
                # A retained request would run again on every connect and every restart (a
                # retained cmd/reload is a reload loop): commands are live messages only.
                logger.warning("mqtt: ignored a retained message on %s: commands must not be "
                               "retained; clear it with mosquitto_pub -r -n -t %s",
                               message.topic, message.topic)
                return
            if self.on_command is not None and message.topic.startswith(prefix):
                props = getattr(message, "properties", None)
                cut_size = getattr(client, "cut_size", None)
                self.on_command(message.topic[len(prefix):], message.payload,
                                getattr(props, "ResponseTopic", None) or None,
                                getattr(props, "CorrelationData", None), broadcast,
                                size=cut_size(message) if cut_size is not None else None)
        except Exception:   # never let an exception end paho's network thread
            logger.exception("mqtt on_message failed")

    def _on_connect_fail(self, client, userdata):
        # The TCP or TLS connection failed (paho keeps no exception): find out why, in
        # paho's thread, which only waits to retry now.
        try:
            self._down(diagnose(self.settings) or "cannot connect (no cause found; it may "
                                                   "have been brief)", attempt=True)
        except Exception:   # never let an exception end paho's network thread
            logger.exception("mqtt on_connect_fail failed")

    def _on_disconnect(self, client, userdata, *args):
        try:
            was_up = self.connected.is_set()
            answered, self._answered = self._answered, False
            self.connected.clear()
            rc = disconnect_code(args)
            if rc != 0 and was_up:
                self._down("connection lost ({})".format(_disconnect_text(args, rc)))
            elif rc != 0 and not answered:
                # TCP (and TLS) worked, then the connection closed before any CONNACK (after
                # a refused one the refusal says more than this disconnect)
                self._down("the connection closed before the broker answered CONNECT: not "
                           "an MQTT broker, mqtt:// on a TLS port, or the broker is at its "
                           "max_connections", attempt=True)
        except Exception:
            logger.exception("mqtt on_disconnect failed")

    def _down(self, cause, attempt=False):
        """The broker cannot be reached (`attempt`: a connection attempt failed): a WARNING
        for each cause the first time it appears in an outage, then one reminder every
        `remind_s` at most (a broker down for a day is not 3000 lines); health told of each
        change."""
        now = time.monotonic()
        if self._outage is None:
            self._outage, self._causes, self.failures, self._reminded = now, set(), 0, now
        if attempt:
            self.failures += 1
        if cause not in self._causes:
            self._causes.add(cause)
            self._reminded = now
            logger.warning("mqtt %s: %s; retrying, messages wait in the queue (mqtt.queue)",
                           self.settings["display"], cause)
        elif now - self._reminded >= self.remind_s:
            self._reminded = now
            logger.warning("mqtt %s: still cannot reach the broker after %s (%d failed "
                           "attempts): %s; retrying", self.settings["display"],
                           _duration(now - self._outage), self.failures, cause)
        if cause != self.last_error:
            self.last_error = cause
            self._changed()

    def _changed(self):
        if self.on_change is not None:
            self.on_change()

    def probe_error(self):
        """Why the broker is not reachable, for the final error message."""
        return self.last_error or diagnose(self.settings, 2.0) or "no connection yet"

    def stop(self, reason="stopped", timeout=5.0):
        """Publish the final `offline` status, wait for it, disconnect."""
        info = self.set_status("offline", reason)
        if info is not None:
            _wait(info, timeout)
        self.client.disconnect()
        self.client.loop_stop()


_OK = 0          # paho's return codes, the same in paho-mqtt 1.x and 2.x
_NO_CONN = 4


def taken(info):
    """Whether paho took a message `MqttLink.publish` handed it (its queue may be full)."""
    return info.rc == _OK


def delivered(info):
    """True once paho is done with a message it took: written to the socket (QoS 0) or
    acknowledged (QoS 1), or given up. paho 2.x marks a QoS 0 message still waiting in its
    buffer when the connection drops as failed, and then is_published() raises
    (RuntimeError "The connection was lost"): the message is gone, so it is done with."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


def lost(info):
    """Whether paho gave up on a message it had taken (after `delivered` says True)."""
    return info.rc != _OK


def _wait(info, timeout):
    deadline = time.monotonic() + timeout
    while not delivered(info) and time.monotonic() < deadline:
        time.sleep(0.01)
    return delivered(info) and not lost(info)


def _duration(seconds):
    """`42 s`, `7 min`, `3.5 h`: how long an outage has lasted, for people."""
    if seconds < 120:
        return "{:.0f} s".format(seconds)
    if seconds < 7200:
        return "{:.0f} min".format(seconds / 60)
    return "{:.1f} h".format(seconds / 3600)


def _disconnect_text(args, code):
    """What paho says of on_disconnect's reason code: its ReasonCode's name in paho 2.x
    ("Unspecified error" for a connection that broke), error_string in 1.x."""
    value = args[-2] if len(args) >= 2 else args[-1]
    if hasattr(value, "getName"):
        text = value.getName()
    else:
        import paho.mqtt.client as paho
        text = paho.error_string(code).rstrip(".")
    return "{}, code {}".format(text, code)


def _connack_text(code):
    return {1: "protocol version", 2: "client id rejected", 3: "server unavailable",
            4: "bad user name or password", 5: "not authorised", 134: "bad user name or password",
            135: "not authorised"}.get(code, "refused")
