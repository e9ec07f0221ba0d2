"""Frame sources chosen by URI: csi://, v4l2://, rtsp://, file://, images://, test://, stereo://.

Each kind is a small module that registers itself with `register` (stereo:// lives with the
rest of stereo, in edge.stereo.source); `open_source(uri)` picks the kind from the URI (or
from a plain path: a folder of images, a /dev/video* device or a video file) and returns an
unopened `Source`. The capture thread that drives a source lives in edge.capture.
"""

import os

from edge.errors import ConfigError
from edge.urls import redact, split, userinfo

_KINDS = {}
# The modules of the built-in kinds, by dotted name: imported by name (importlib) so that a
# kind living in its capability's package (edge.stereo) is no import circle with this one.
BUILTIN = ("edge.sources.images", "edge.sources.pattern", "edge.sources.video",
           "edge.stereo.source")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def register(scheme):
    """Class decorator: make a Source subclass the handler of `scheme://` URIs."""
    def wrap(cls):
        _KINDS[scheme] = cls
        cls.scheme = scheme
        return cls
    return wrap


class Source:
    """A camera, stream, file, folder or pattern that fills frame slots.

    `read_into(frame)` has three outcomes, as in jetson-utils: True (the slot holds a new
    frame), False (end of stream: finite sources only), or SourceError (a failure; live
    sources are reopened with backoff by the capture thread).
    """

    scheme = None
    live = True           # live sources keep the newest frame and drop; finite ones never drop
    max_pixels = None     # images and video frames larger than this are refused, from the
                          # header or container before decoding (config max_image_pixels)

    def __init__(self, uri, location, params):
        self.uri = uri
        self.display = redact(uri, uri)   # for logs and messages: no camera password
        self.location = location   # the part after scheme:// (path, host, device)
        self.params = params       # query parameters, str -> str

    def shown(self, text):
        """`text` (an error about this source, a path made from its URI) as logs and
        messages may show it: the URI's password hidden wherever it appears. A location read
        from a URI with a user name or password (where a / ? or # in the password cut it
        short, it is a piece of the password) is named by the URI instead."""
        if self.location and self.location in text and userinfo(self.uri) is not None:
            text = text.replace(self.location, self.display)
        return redact(text, self.uri)

    def open(self):
        """Open the device or file; raises SourceError with a fix."""

    def read_into(self, frame):
        """Fill `frame` (image, index, ts, name); False at the end of a finite source."""
        raise NotImplementedError

    def close(self):
        """Release the device or file; safe to call twice."""

    def __repr__(self):
        return "<{} {}>".format(type(self).__name__, self.display)


def kinds():
    """Registered URI schemes."""
    _load_builtin()
    return sorted(_KINDS)


def _load_builtin():
    # Imported here, not at the top, so a kind's heavy imports (cv2) load only when needed.
    import importlib
    for name in BUILTIN:
        importlib.import_module(name)


def parse_uri(uri):
    """(scheme, location, params) for a source URI or plain path."""
    from urllib.parse import parse_qsl, urlsplit
    if "://" not in uri:
        path = os.path.expanduser(uri)
        if os.path.isdir(path) or path.lower().endswith(_IMAGE_EXTENSIONS):
            return "images", path, {}
        if path.startswith("/dev/video"):
            return "v4l2", path, {}
        return "file", path, {}
    # Kind and parameters from the URI without its user name and password: a password may
    # hold / ? # & = [ ], which must neither become parameters (nor be quoted as such) nor
    # make the URI unreadable (urllib takes a [ in it for an IPv6 host).
    head, info, rest = split(uri)
    try:
        parts = urlsplit(uri if info is None else head + rest)
    except ValueError as e:       # a bad IPv6 host, as in rtsp://[::1/stream
        raise ConfigError("source {!r}: not a valid URI ({}); check it (a [ or ] in a user "
                          "name or password is written %5B, %5D)".format(redact(uri, uri), e))
    scheme = parts.scheme.lower()
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme in ("file", "images", "v4l2"):
        try:
            parts = urlsplit(uri)      # the path as it always was read
        except ValueError:
            pass
        location = (parts.netloc + parts.path) if parts.netloc else parts.path
        return scheme, os.path.expanduser(location), params
    if scheme == "rtsp":
        return scheme, uri, params
    return scheme, parts.netloc + parts.path, params


def open_source(uri, max_pixels=None):
    """The Source for `uri` (not yet opened); SourceError for an unknown kind.

    `max_pixels`: config `max_image_pixels`, for the kinds that decode images or video.
    """
    from edge import imagefiles
    _load_builtin()
    scheme, location, params = parse_uri(uri)
    cls = _KINDS.get(scheme)
    if cls is None:
        raise ConfigError("source {!r}: unknown kind {!r}; use one of {}".format(
            redact(uri, uri), scheme, ", ".join(s + "://" for s in sorted(_KINDS))))
    source = cls(uri, location, params)
    source.max_pixels = max_pixels or imagefiles.DEFAULT_MAX_PIXELS
    return source


def first_frame(source):
    """Open the source, read its first frame into a Frame of its own and close it: the
    Frame, or None when the source gave none (what tools size their engines by)."""
    from edge.frames import Frame
    frame = Frame(0, (2, 2, 3))         # read_into sizes it to the source's frames
    source.open()
    try:
        return frame if source.read_into(frame) else None
    finally:
        source.close()
