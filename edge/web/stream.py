"""The live picture: each camera's frames with their overlays as MJPEG
(`multipart/x-mixed-replace`), which every browser shows in an <img> without a plugin.

Nothing runs while nobody watches. The first viewer of a camera starts its encoder thread
("web-stream"): at the highest rate its viewers ask, it takes a copy of the camera's next
captured frame (Pipeline.tap: the capture thread copies a frame only while a copy is asked
for), draws the newest message of each task onto it (boxes, labels, scores, track ids, the
spatial z), the camera's zones and lines, encodes it once, and leaves the JPEG for every
viewer of the camera to send. The last viewer to leave ends the encoder.

Each viewer sends on its own connection's thread, at its own rate, always the newest JPEG
(frames it was too slow for are skipped, never queued), with a bounded socket buffer: one
that stops reading blocks only itself, and is dropped (and counted) after web.timeout. A
stream gives its connection's client slot back once it starts, so viewers never crowd out
the API: they are bounded on their own by web.max_viewers.
"""

import logging
import socket
import threading
import time

from edge.web.server import ApiError

logger = logging.getLogger(__name__)

DEFAULT_FPS = 5.0           # frames/s of a stream that asks none (?fps=)
MIN_FPS = 0.2
JPEG_QUALITY = 75
TAP_TIMEOUT_S = 1.0         # a camera that delivers nothing is asked again after this
SEND_BUFFER = 256 * 1024    # bytes of kernel buffer per viewer: a few frames, then it waits
BOUNDARY = b"frame"


def _scaled(points, item, width, height):
    """An item's points in pixels of a width x height picture, as int32 (N, 2)."""
    import numpy as np
    array = np.asarray(points, np.float64).reshape(-1, 2)
    if item.get("normalized"):
        array = array * (width, height)
    return np.int32(np.round(array))


def draw_regions(image, regions):
    """A camera's zones (closed outlines) and lines (with their names) onto `image`."""
    import cv2
    height, width = image.shape[:2]
    thickness = max(1, int(round(max(height, width) / 400)))
    for zone in regions.get("zones") or ():
        points = _scaled(zone["points"], zone, width, height)
        cv2.polylines(image, [points], True, (255, 160, 0), thickness, cv2.LINE_AA)
        _text(image, zone["name"], points.mean(axis=0), (255, 160, 0))    # in its middle
    for line in regions.get("lines") or ():
        points = _scaled(line["points"], line, width, height)
        cv2.polylines(image, [points], False, (0, 200, 255), thickness + 1, cv2.LINE_AA)
        _text(image, line["name"], points.mean(axis=0), (0, 200, 255))


def draw_depth(image, message):
    """`z 1.23 m` under each detection that carries a spatial position (stereo runs)."""
    for det in message.get("detections") or ():
        spatial = det.get("spatial")
        if not spatial or spatial.get("z") is None or not det.get("box"):
            continue
        x1, _, _, y2 = det["box"]
        _text(image, "z {:.2f} m".format(spatial["z"] / 1000.0), (int(x1), int(y2) + 14),
              (255, 255, 255))


def _text(image, text, origin, colour):
    import cv2
    x, y = int(origin[0]), max(12, int(origin[1]))
    cv2.putText(image, text, (x + 3, y - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3,
                cv2.LINE_AA)
    cv2.putText(image, text, (x + 3, y - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1,
                cv2.LINE_AA)


class Encoder(threading.Thread):
    """One camera's stream: its pictures drawn and encoded once, for all its viewers."""

    def __init__(self, streams, camera):
        super().__init__(name="web-stream", daemon=True)
        self.streams = streams
        self.camera = camera        # the pipeline's key (None: the one unnamed camera)
        self.rates = []             # frames/s each viewer asks
        self.cond = threading.Condition()
        self.chunk = None           # the newest part of the stream: headers and JPEG
        self.seq = 0                # counts the chunks made
        self.closed = False
        self.encoded = 0            # frames encoded, and their encode time in s
        self.encode_s = 0.0

    def run(self):
        streams = self.streams
        try:
            while not streams.stop_event.is_set():
                with streams.lock:
                    if not self.rates:
                        break
                    period = 1.0 / max(self.rates)
                begun = time.monotonic()
                chunk = self._picture()
                if chunk is not None:
                    with self.cond:
                        self.chunk = chunk
                        self.seq += 1
                        self.cond.notify_all()
                rest = period - (time.monotonic() - begun)
                if rest > 0:
                    streams.stop_event.wait(rest)
        except Exception:   # a bug: this camera's stream ends, not the daemon
            logger.exception("web: the live picture of camera %s failed", self.camera)
        finally:
            with streams.lock:
                if streams.encoders.get(self.camera) is self:
                    del streams.encoders[self.camera]
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def _picture(self):
        """The next frame with its overlays, as a part of the stream; None when none came."""
        import cv2
        app = self.streams.app
        pipeline = app.pipeline
        if pipeline is None:            # starting, or between a reload's two pipelines
            self.streams.stop_event.wait(TAP_TIMEOUT_S)
            return None
        tapped = pipeline.tap(TAP_TIMEOUT_S, self.camera)
        if tapped is None:
            return None
        image = tapped[0]
        for task in list(app.tasks):
            message = task.last_messages.get(self.camera)
            if message is not None:
                task.draw(image, message)
                draw_depth(image, message)
            regions = task.regions(self.camera) if hasattr(task, "regions") else None
            if regions:
                draw_regions(image, regions)
        begun = time.perf_counter()
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        self.encode_s += time.perf_counter() - begun
        self.encoded += 1
        if not ok:
            return None
        data = jpeg.tobytes()
        return b"".join((b"--", BOUNDARY, b"\r\nContent-Type: image/jpeg\r\nContent-Length: ",
                         str(len(data)).encode(), b"\r\n\r\n", data, b"\r\n"))


class Streams:
    """The live pictures of one daemon (`app`): at most `max_viewers` at once, over all
    cameras; each camera's Encoder runs while it has a viewer."""

    def __init__(self, app, max_viewers, max_fps):
        self.app = app
        self.max_viewers = max_viewers
        self.max_fps = max_fps
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.encoders = {}          # camera -> Encoder
        self.viewers = 0
        self.counts = {"streams": 0, "refused": 0, "dropped": 0}
        self.encoded = {}           # camera label -> [frames, seconds] of ended encoders

    def rate(self, asked):
        """The frames/s of `?fps=` (None: the default); 400 naming the range otherwise."""
        if asked is None:
            return min(DEFAULT_FPS, self.max_fps)
        try:
            fps = float(asked)
        except ValueError:
            fps = None
        if fps is None or not MIN_FPS <= fps <= self.max_fps:
            raise ApiError(400, "fps: {!r} is not a rate from {} to {} frames/s (web.max_fps); "
                                "e.g. ?fps=5".format(asked[:40], MIN_FPS, self.max_fps))
        return fps

    def serve(self, handler, camera, label, fps):
        """Stream a camera to this connection until the viewer leaves, stalls past
        web.timeout (dropped, counted) or the server stops; 503 past web.max_viewers."""
        with self.lock:
            if self.viewers >= self.max_viewers or self.stop_event.is_set():
                self.counts["refused"] += 1
                refused = self.counts["refused"]
            else:
                refused = None
                self.viewers += 1
                self.counts["streams"] += 1
                encoder = self.encoders.get(camera)
                fresh = encoder is None
                if fresh:
                    encoder = self.encoders[camera] = Encoder(self, camera)
                encoder.rates.append(fps)
        if refused is not None:
            if refused == 1 or refused % 100 == 0:
                logger.warning("web: %d live pictures at once already (web.max_viewers); "
                               "refused %d so far", self.max_viewers, refused)
            raise ApiError(503, "busy: {} live pictures already (web.max_viewers); try again "
                                "later".format(self.max_viewers), {"Retry-After": "5"})
        try:
            if fresh:
                encoder.start()
            handler.server.detach(handler.request)
            self._send(handler, encoder, fps)
        except socket.timeout:
            with self.lock:
                self.counts["dropped"] += 1
            logger.info("web: a viewer of camera %s stopped reading for %.0f s; dropped",
                        label, handler.server.client_timeout)
        except OSError:
            pass            # the viewer went away
        finally:
            with self.lock:
                self.viewers -= 1
                encoder.rates.remove(fps)
                if not encoder.rates and self.encoders.get(camera) is encoder:
                    del self.encoders[camera]       # it ends at its next turn
                    totals = self.encoded.setdefault(label, [0, 0.0])
                    totals[0] += encoder.encoded
                    totals[1] += encoder.encode_s

    def _send(self, handler, encoder, fps):
        sock = handler.connection
        try:    # a stalled viewer holds this much of the kernel's memory, then blocks
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass
        handler.send_response(200)
        handler.send_header("Content-Type", "multipart/x-mixed-replace; boundary=" +
                            BOUNDARY.decode())
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.end_headers()
        period = 1.0 / fps
        seq = 0
        due = time.monotonic()
        while True:
            wait = due - time.monotonic()
            if wait > 0 and self.stop_event.wait(wait):
                return
            with encoder.cond:
                while encoder.seq == seq and not encoder.closed and \
                        not self.stop_event.is_set():
                    encoder.cond.wait(1.0)
                if encoder.seq == seq:
                    return      # the encoder ended (a bug, logged) or the server stops
                chunk, seq = encoder.chunk, encoder.seq
            due = max(due + period, time.monotonic() - period)
            sock.sendall(chunk)     # web.timeout: socket.timeout for a viewer that stalls

    def figures(self):
        """{viewers, max_viewers, streams (served so far), refused, dropped, cameras: {label:
        {viewers, encoded, encode_ms}}}: encode_ms the mean JPEG encode time per frame."""
        with self.lock:
            out = dict(self.counts, viewers=self.viewers, max_viewers=self.max_viewers)
            totals = {label: list(value) for label, value in self.encoded.items()}
            live = [(encoder, len(encoder.rates)) for encoder in self.encoders.values()]
        cameras = {}
        from edge.config import UNNAMED
        for encoder, viewers in live:
            label = UNNAMED if encoder.camera is None else encoder.camera
            frames, seconds = totals.pop(label, (0, 0.0))
            cameras[label] = (viewers, frames + encoder.encoded, seconds + encoder.encode_s)
        for label, (frames, seconds) in totals.items():
            cameras[label] = (0, frames, seconds)
        out["cameras"] = {label: {"viewers": viewers, "encoded": frames,
                                  "encode_ms": round(seconds * 1000.0 / frames, 2)
                                  if frames else None}
                          for label, (viewers, frames, seconds) in sorted(cameras.items())}
        return out

    def stop(self):
        """End every stream and encoder at once."""
        self.stop_event.set()
        with self.lock:
            encoders = list(self.encoders.values())
        for encoder in encoders:
            with encoder.cond:
                encoder.cond.notify_all()
