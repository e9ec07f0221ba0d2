"""Sources read through OpenCV's VideoCapture: file://, v4l2://, rtsp://, http(s):// and csi://.

Each kind only says how to open its capture; reading is shared. OpenCV decodes straight into
the slot's buffer when the buffer already has the stream's size, so steady state allocates
nothing per frame.

cv2 is imported where it is used, not with the module: every source kind is registered at
once, and a daemon on test:// or an image folder need not carry OpenCV (about 17 MB of RSS).
"""

import logging
import os
import re
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from edge import imagefiles
from edge.errors import ConfigError, SourceError
from edge.sources import Source, register
from edge.sources.pattern import MAX_SIZE, check_params, int_param
from edge.urls import split, userinfo

logger = logging.getLogger(__name__)

# Milliseconds; a network stream that hangs must fail the read so the capture thread reopens it.
OPEN_TIMEOUT_MS = 10000
READ_TIMEOUT_MS = 5000
# Said when a stream with / ? or # in its credentials cannot be opened (never which one).
_ENCODE_HINT = "; a / ? or # in the user name or password must be percent-encoded " \
               "(%2F %3F %23)"
# Frames of a file that fail to decode in a row before it is taken as ended: a damaged stretch
# is skipped (and counted) when later frames decode again.
MAX_BAD_FRAMES = 25


class VideoCaptureSource(Source):
    """Shared reading for every kind backed by cv2.VideoCapture; subclasses implement _capture."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        self._cap = None
        self._size = None      # (height, width) the next read decodes into, when known
        self._index = 0

    def _capture(self):
        """An opened cv2.VideoCapture; raises SourceError with a fix."""
        raise NotImplementedError

    def reserved(self):
        """Whether the URL's user name or password holds / ? or #: FFmpeg ends the address
        at the first of them, so the camera never gets the credentials as written."""
        info = userinfo(self.uri)
        return info is not None and any(c in info for c in "/?#")

    def open(self):
        """Open the capture and learn the stream's frame size; SourceError when its frames
        have more pixels than `max_image_pixels`."""
        import cv2
        self.close()
        self._cap = self._capture()
        width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self._size = (height, width) if width > 0 and height > 0 else None
        if self._size is not None:
            # From the container or the camera's mode, before the first frame is decoded: a
            # 2.7 MB MJPEG AVI can hold 12000x12000 frames, 432 MB each once decoded into
            # every slot of the pool.
            try:
                self._check_size(width, height)
            except SourceError:
                self.close()
                raise
        logger.info("opened %s (%s)", self.display,
                    "{}x{}".format(width, height) if self._size else "size unknown")

    def _check_size(self, width, height):
        limit = self.max_pixels or imagefiles.DEFAULT_MAX_PIXELS
        if width * height > limit:
            raise SourceError("{}: {}x{} pixels a frame, over the limit of {} "
                              "(max_image_pixels); {} or raise max_image_pixels".format(
                                  self._what(), width, height, limit, self._smaller()))

    def _what(self):
        """The source as its errors name it."""
        return self.display

    def _smaller(self):
        """How to get smaller frames from this kind of source (the fix for `_check_size`)."""
        return "set the camera or stream to a smaller resolution"

    def read_into(self, frame):
        """Decode the next frame into `frame`; False at the end of a file."""
        if self._cap is None:
            raise SourceError("source {} is not open".format(self.display))
        while True:
            if self._size is not None:
                frame.ensure_shape(*self._size)
            ok, image = self._cap.read(frame.image)
            if ok and image is not None:
                break
            if not self._skip_bad_frame():
                return self._read_failed()
        if image is not frame.image:
            # The stream's size differs from the slot's (or was unknown): copy once and decode
            # in place from the next frame on. A size the container did not tell (or a stream
            # that changed mode) is checked here, before the slots are sized to it.
            self._check_size(image.shape[1], image.shape[0])
            if image.ndim == 2:
                import cv2
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            self._size = image.shape[:2]
            np.copyto(frame.ensure_shape(*self._size), image)
        self._read_good()
        frame.index = self._index
        frame.ts = time.time()
        frame.name = None
        self._index += 1
        return True

    def _skip_bad_frame(self):
        """After a failed read: True to try the next frame (a file's damaged frame), False
        when the failure stands (live kinds reopen)."""
        return False

    def _read_good(self):
        """After a frame decoded (a file counts the damaged frames it skipped)."""

    def _read_failed(self):
        # Live kinds: a camera or stream that stops delivering is an error to reopen from.
        raise SourceError("{} stopped delivering frames".format(self.display))

    def close(self):
        """Release the capture; safe to call twice."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _timeouts():
    # VideoCapture open/read timeouts exist from OpenCV 4.5.2; JetPack 4 ships 4.1.1.
    import cv2
    if hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
        return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
    return None


def _open_capture(target, api, params=None):
    import cv2
    cap = cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
    if cap.isOpened():
        return cap
    cap.release()
    return None


@register("file")
class VideoFileSource(VideoCaptureSource):
    """A video file; finite, so its frames are never dropped."""

    live = False

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ())
        self.path = location
        self._expected = 0     # frame count from the file's header, when it has one
        self.skipped = 0       # frames that did not decode, followed by ones that did
        self._bad_run = 0      # failed reads since the last good frame

    def _capture(self):
        import cv2
        if not os.path.isfile(self.path):
            raise SourceError("video file {} does not exist; check the --source path".format(
                self.shown(self.path)))
        self._check_image_header()
        cap = _open_capture(self.path, cv2.CAP_ANY)
        if cap is None:
            raise SourceError("video file {}: cannot decode it; convert it to H.264 MP4 or "
                              "MJPG AVI (ffmpeg -i IN -c:v libx264 OUT.mp4)".format(
                                  self.shown(self.path)))
        self._expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        return cap

    def _check_image_header(self):
        # An image given as file:// is opened by OpenCV as a one-frame video. Its size is
        # read from its header first, as for image folders: a backend may decode the first
        # frame while opening (GStreamer prerolls), and a 746 KB PNG can hold 16000x16000.
        try:
            with open(self.path, "rb") as f:
                head = f.read(12)
                if imagefiles.format_of(head) is None:
                    return         # a video: its container's size is checked once open
                data = head + f.read()     # a JPEG's size may follow 64 KB segments of EXIF
        except OSError as e:
            raise SourceError("video file {}: cannot be read ({})".format(
                self.shown(self.path), e.strerror or e))
        imagefiles.check(data, "image file " + self.shown(self.path),
                         self.max_pixels or imagefiles.DEFAULT_MAX_PIXELS)

    def _what(self):
        return "video file " + self.shown(self.path)

    def _smaller(self):
        return "scale it down (ffmpeg -i IN -vf scale=1920:-2 OUT.mp4)"

    def _skip_bad_frame(self):
        # Each failed read consumes the damaged frame, so the next may decode. Counted only
        # once a good frame follows: failures at the end are the end of the file.
        if self._bad_run >= MAX_BAD_FRAMES or \
                (self._expected and self._index + self._bad_run >= self._expected):
            self._bad_run = 0
            return False
        self._bad_run += 1
        return True

    def _read_good(self):
        if self._bad_run:
            logger.warning("video file %s: %d frame(s) after frame %d do not decode "
                           "(damaged); skipped", self.shown(self.path), self._bad_run,
                           self._index - 1)
            self.skipped += self._bad_run
            self._index += self._bad_run      # frame indices keep their place in the file
            self._bad_run = 0

    def _read_failed(self):
        # End of file. No frame at all, or fewer than the header promised, means a bad file.
        if self._index == 0:
            raise SourceError("video file {}: cannot decode any frame; check the file plays "
                              "(ffplay FILE) or convert it to H.264 MP4".format(
                                  self.shown(self.path)))
        if self._index < self._expected:
            logger.warning("video file %s ended after %d of %d frames: truncated or corrupt",
                           self.shown(self.path), self._index, self._expected)
            self._expected = 0    # warn once
        return False


@register("v4l2")
class V4l2Source(VideoCaptureSource):
    """A USB or other V4L2 camera: `v4l2:///dev/video0?width=1280&height=720&fps=30`."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ("width", "height", "fps"))
        self.device = "/dev/video" + location if location.isdigit() else location
        self.width = int_param(self, "width", 0, 1, MAX_SIZE)     # 0: the camera's default
        self.height = int_param(self, "height", 0, 1, MAX_SIZE)
        self.fps = int_param(self, "fps", 0, 1, 1000)

    def _capture(self):
        import cv2
        if not os.path.exists(self.device):
            raise SourceError("camera {} does not exist; list cameras with "
                              "`v4l2-ctl --list-devices`".format(self.shown(self.device)))
        cap = _open_capture(self.device, cv2.CAP_V4L2)
        match = re.match(r"/dev/video(\d+)$", self.device)
        if cap is None and match:
            # Some OpenCV builds open V4L2 devices only by index.
            cap = _open_capture(int(match.group(1)), cv2.CAP_V4L2)
        if cap is None:
            raise SourceError("camera {} cannot be opened; check it is a capture device not "
                              "used by another program, and that this user is in the video "
                              "group".format(self.shown(self.device)))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width),
                            (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                            (cv2.CAP_PROP_FPS, self.fps)):
            if value:
                cap.set(prop, value)
        return cap

    def _smaller(self):
        return "ask for a smaller mode (?width=&height=; `v4l2-ctl --list-formats-ext`)"


@register("rtsp")
class RtspSource(VideoCaptureSource):
    """An RTSP stream through FFmpeg; `latency` (ms) is accepted for GStreamer pipelines only."""

    OWN_PARAMS = ("latency",)

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        # Other query parameters belong to the camera's URL and are passed on untouched.
        self.latency = int_param(self, "latency", 0, 0, 60000)
        self.url = _without_params(location, self.OWN_PARAMS)

    def _capture(self):
        import cv2
        cap = _open_capture(self.url, cv2.CAP_FFMPEG, _timeouts())
        if cap is None:
            raise SourceError("stream {} cannot be opened; check the address, credentials and "
                              "that the camera is reachable (ffplay URL){}".format(
                                  self.display, _ENCODE_HINT if self.reserved() else ""))
        return cap


@register("http")
class HttpSource(VideoCaptureSource):
    """A network camera's HTTP stream through FFmpeg: MJPEG (multipart/x-mixed-replace), as
    most IP cameras serve it, or any stream FFmpeg reads from a URL. Live: a stream that
    stops is reopened with backoff. Query parameters belong to the camera's URL."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        self.url = uri

    def _capture(self):
        import cv2
        cap = _open_capture(self.url, cv2.CAP_FFMPEG, _timeouts())
        if cap is None:
            raise SourceError("stream {} cannot be opened; check the address, credentials and "
                              "that the camera serves it (ffplay URL){}".format(
                                  self.display, _ENCODE_HINT if self.reserved() else ""))
        return cap


@register("https")
class HttpsSource(HttpSource):
    """The same over TLS."""


def _without_params(url, names):
    # The user name and password are set aside and put back as written: urllib would take a
    # ? or # in a password for the query, and a [ for an IPv6 host.
    head, info, rest = split(url)
    parts = urlsplit(url if info is None else head + rest)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in names]
    clean = urlunsplit(parts._replace(query=urlencode(query)))
    return clean if info is None else clean[:len(head)] + info + "@" + clean[len(head):]


def csi_pipeline(sensor_id, width, height, fps, flip):
    """The GStreamer pipeline that reads a Jetson CSI camera as BGR frames into appsink."""
    return ("nvarguscamerasrc sensor-id={id} ! "
            "video/x-raw(memory:NVMM), width={w}, height={h}, framerate={fps}/1, format=NV12 ! "
            "nvvidconv flip-method={flip} ! "
            "video/x-raw, width={w}, height={h}, format=BGRx ! "
            "videoconvert ! video/x-raw, format=BGR ! "
            "appsink drop=true max-buffers=1").format(
                id=sensor_id, w=width, h=height, fps=fps, flip=flip)


def has_gstreamer():
    """Whether this cv2 was built with GStreamer (pip wheels are not; JetPack's is)."""
    import cv2
    match = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation())
    return bool(match) and match.group(1).upper() != "NO"


@register("csi")
class CsiSource(VideoCaptureSource):
    """A Jetson CSI camera through nvarguscamerasrc: `csi://0?width=1280&height=720&fps=30`."""

    def __init__(self, uri, location, params):
        super().__init__(uri, location, params)
        check_params(self, ("width", "height", "fps", "flip"))
        if location and not location.isdigit():
            raise ConfigError("source {!r}: the CSI sensor must be a number, as in csi://0".format(
                self.display))
        self.sensor_id = int(location or 0)
        self.width = int_param(self, "width", 1280, 1, MAX_SIZE)
        self.height = int_param(self, "height", 720, 1, MAX_SIZE)
        self.fps = int_param(self, "fps", 30, 1, 1000)
        self.flip = int_param(self, "flip", 0, 0, 7)

    def _capture(self):
        import cv2
        if not has_gstreamer():
            raise SourceError("csi://{}: this OpenCV has no GStreamer support; on a Jetson use "
                              "the JetPack system OpenCV (python3-opencv) and do not pip-install "
                              "opencv-python".format(self.sensor_id))
        pipeline = csi_pipeline(self.sensor_id, self.width, self.height, self.fps, self.flip)
        cap = _open_capture(pipeline, cv2.CAP_GSTREAMER)
        if cap is None:
            raise SourceError("csi://{}: the camera cannot be opened; check the ribbon cable and "
                              "restart the Argus daemon (sudo systemctl restart "
                              "nvargus-daemon)".format(self.sensor_id))
        return cap

    def _smaller(self):
        return "ask for a smaller mode (?width=&height=)"
