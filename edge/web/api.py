"""The web API's routes: the cameras, and each camera's zones and lines (read, replaced live,
saved in {state_dir}/zones.json).

A camera is named in URLs as in the configuration; the one unnamed camera (`source:`) is
`source`. Bodies are the configuration's own form, checked by the configuration's own specs
(edge.config TRACK_ZONES, TRACK_LINES), so an error reads as it would in the file:
`camera front: zones[0].points: must be ...`.
"""

import contextlib
import importlib.util
import os
import threading
from urllib.parse import unquote

from edge import config as configuration
from edge import validate
from edge.errors import ConfigError
from edge.files import atomic_write
from edge.web import page
from edge.web.server import ApiError, Route

KINDS = {"zones": configuration.TRACK_ZONES, "lines": configuration.TRACK_LINES}
NAME = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
ITEM = r"([^/]{1,200})"      # a zone's or line's name, percent-encoded


class Api:
    """The routes of one daemon (`app`: edge.daemon.Daemon, read at each request: a reload
    replaces its pipeline and tasks)."""

    def __init__(self, app, server_figures, streams=None):
        self.app = app
        self.server_figures = server_figures      # () -> the server's counts
        self.streams = streams                    # edge.web.stream.Streams: live pictures
        # one change at a time: read, check, save, hand over (two PUTs never interleave)
        self.lock = threading.Lock()

    def routes(self):
        return [
            Route(r"/api/cameras", GET=self.cameras),
            Route(r"/api/cameras/{}/(zones|lines)".format(NAME), GET=self.get_regions,
                  PUT=self.put_regions),
            Route(r"/api/cameras/{}/(zones|lines)/{}".format(NAME, ITEM),
                  DELETE=self.delete_region),
            Route(r"/api/cameras/{}/labels".format(NAME), GET=self.labels),
            Route(r"/api/cameras/{}/stream".format(NAME), GET=self.stream),
            Route(r"/api/health", GET=self.health),
            Route(r"/api/server", GET=self.server),
        ] + page.routes()

    # -- helpers -----------------------------------------------------------------------

    def _snapshot(self):
        pipeline = self.app.pipeline
        if pipeline is None:
            raise ApiError(503, "the pipeline is starting; try again in a moment",
                           {"Retry-After": "1"})
        return pipeline.snapshot()

    def _camera(self, name):
        """The camera's key in the pipeline (None: the unnamed one); 404 for no such one."""
        names = [view.name for view in self._snapshot().cameras]
        if names == [None]:
            if name == configuration.UNNAMED:
                return None
        elif name in names:
            return name
        shown = ", ".join(configuration.UNNAMED if n is None else n for n in names)
        raise ApiError(404, "no camera {!r}; the cameras: {}".format(name, shown))

    def _editors(self, camera):
        """The tasks that track this camera (they take zones and lines)."""
        found = [task for task in self.app.tasks
                 if hasattr(task, "regions") and task.regions(camera) is not None]
        if not found:
            raise ApiError(409, "camera {} is not tracked, so it has no zones or lines; set a "
                                "detector and track.enabled: true".format(
                                    configuration.UNNAMED if camera is None else camera))
        return found

    # -- routes ------------------------------------------------------------------------

    def cameras(self, request):
        """GET /api/cameras: each camera's name, newest frame size, state and rate."""
        out = []
        for view in self._snapshot().cameras:
            tracked = any(hasattr(task, "regions") and task.regions(view.name) is not None
                          for task in self.app.tasks)
            out.append({"name": configuration.UNNAMED if view.name is None else view.name,
                        "width": view.width, "height": view.height, "state": view.state,
                        "frames": view.frames, "fps": view.fps, "tracked": tracked})
        request.reply(200, {"cameras": out})

    def get_regions(self, request, name, kind):
        """GET /api/cameras/{name}/zones|lines: what the camera uses now."""
        camera = self._camera(name)
        request.reply(200, self._editors(camera)[0].regions(camera)[kind])

    def put_regions(self, request, name, kind):
        """PUT /api/cameras/{name}/zones|lines: check, save, then hand over to the tracker
        (from its next frame); 200 with the items as used (defaults filled in)."""
        camera = self._camera(name)
        request.reply(200, self._replace(name, camera, kind, request.read_json()))

    def delete_region(self, request, name, kind, item):
        """DELETE /api/cameras/{name}/zones|lines/{item}: the list without that one, as a
        PUT of it would; 200 with the list left."""
        camera = self._camera(name)
        item = unquote(item)
        with self._changing():
            items = self._editors(camera)[0].regions(camera)[kind]
            kept = [dict(i) for i in items if i["name"] != item]
            if len(kept) == len(items):
                raise ApiError(404, "camera {} has no {} named {!r}; its {}: {}".format(
                    name, kind[:-1], item[:64], kind,
                    ", ".join(i["name"] for i in items) or "none"))
            request.reply(200, self._replace(name, camera, kind, kept, locked=True))

    def _replace(self, name, camera, kind, body, locked=False):
        where = "camera {}".format(name)
        try:
            items = validate.check({kind: body}, {kind: KINDS[kind]}, where)[kind]
        except ConfigError as e:
            raise ApiError(400, str(e))
        if locked:
            return self._hand_over(name, camera, kind, items, where)
        with self._changing():
            return self._hand_over(name, camera, kind, items, where)

    @contextlib.contextmanager
    def _changing(self):
        """One change at a time, and none while the daemon reloads: it reads the saved zones
        and lines, then builds and swaps in new tasks, so a change saved in between would
        be kept on disk but not used until the next restart. 503 (retry) then."""
        with self.lock:
            if not self.app.regions_lock.acquire(blocking=False):
                raise ApiError(503, "the daemon is reloading its configuration; try again in "
                                    "a moment", {"Retry-After": "2"})
            try:
                yield
            finally:
                self.app.regions_lock.release()

    def _hand_over(self, name, camera, kind, items, where):
        editors = self._editors(camera)
        try:
            # every editor checks the labels before anything is saved or changed
            for task in editors:
                task.check_regions(camera, **{kind: items}, where=where)
        except ConfigError as e:
            raise ApiError(400, str(e))
        self._save(name, kind, items)
        for task in editors:
            task.replace_regions(camera, **{kind: items}, where=where)
        return items

    def labels(self, request, name):
        """GET /api/cameras/{name}/labels: the labels its zones and lines may name."""
        camera = self._camera(name)
        card = getattr(self._editors(camera)[0], "card", None)
        request.reply(200, {"labels": list(getattr(card, "labels", None) or [])})

    def stream(self, request, name):
        """GET /api/cameras/{name}/stream?fps=N: the live picture with its overlays (MJPEG)
        until the viewer leaves; 503 past web.max_viewers."""
        camera = self._camera(name)
        if self.streams is None or self.streams.max_viewers == 0:
            raise ApiError(404, "no live picture: web.max_viewers is 0; set it above 0 to watch")
        fps = self.streams.rate(request.query_value("fps"))
        if importlib.util.find_spec("cv2") is None:     # the encoder's
            raise ApiError(501, "the live picture needs OpenCV for Python (on a Jetson: "
                                "sudo apt-get install python3-opencv; elsewhere: pip install "
                                "opencv-python-headless)")
        self.streams.serve(request, camera, name, fps)

    def health(self, request):
        """GET /api/health: the daemon's health report, as on its `health` topic."""
        health = self.app.health
        if health is None:
            raise ApiError(503, "the daemon is starting; try again in a moment",
                           {"Retry-After": "1"})
        request.reply(200, health.report(sample_system=False))

    def server(self, request):
        """GET /api/server: the web server's own counts (clients, refused, timeouts), and
        the live pictures' (`streams`)."""
        figures = self.server_figures()
        if self.streams is not None:
            figures["streams"] = self.streams.figures()
        request.reply(200, figures)

    def _save(self, name, kind, items):
        path = configuration.saved_regions_path(self.app.config)
        try:
            saved = configuration.load_saved_regions(path)
        except ConfigError as e:
            raise ApiError(500, "not saved, nothing changed: {}".format(e))
        entry = saved.setdefault(name, {"zones": None, "lines": None})
        entry[kind] = items
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, configuration.saved_regions_document(saved))
        except OSError as e:
            raise ApiError(507 if e.errno == 28 else 500,
                           "not saved, nothing changed: cannot write {} ({}); free space "
                           "or make state_dir writable".format(path, e.strerror or e))
