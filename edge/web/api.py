"""The web API's routes: the cameras, and each camera's zones and lines (read, replaced live,
saved in {state_dir}/zones.json).

A camera is named in URLs as in the configuration; the one unnamed camera (`source:`) is
`source`. Bodies are the configuration's own form, checked by the configuration's own specs
(edge.config TRACK_ZONES, TRACK_LINES), so an error reads as it would in the file:
`camera front: zones[0].points: must be ...`.
"""

import os
import threading

from edge import config as configuration
from edge import validate
from edge.errors import ConfigError
from edge.files import atomic_write
from edge.web.server import ApiError, Route

KINDS = {"zones": configuration.TRACK_ZONES, "lines": configuration.TRACK_LINES}
NAME = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"


class Api:
    """The routes of one daemon (`app`: edge.daemon.Daemon, read at each request: a reload
    replaces its pipeline and tasks)."""

    def __init__(self, app, server_figures):
        self.app = app
        self.server_figures = server_figures      # () -> the server's counts
        # one change at a time: read, check, save, hand over (two PUTs never interleave)
        self.lock = threading.Lock()

    def routes(self):
        return [
            Route(r"/api/cameras", GET=self.cameras),
            Route(r"/api/cameras/{}/(zones|lines)".format(NAME), GET=self.get_regions,
                  PUT=self.put_regions),
            Route(r"/api/server", GET=self.server),
        ]

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
        body = request.read_json()
        where = "camera {}".format(name)
        try:
            items = validate.check({kind: body}, {kind: KINDS[kind]}, where)[kind]
        except ConfigError as e:
            raise ApiError(400, str(e))
        with self.lock:
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
        request.reply(200, items)

    def server(self, request):
        """GET /api/server: the web server's own counts (clients, refused, timeouts)."""
        request.reply(200, self.server_figures())

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
