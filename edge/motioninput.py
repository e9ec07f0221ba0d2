"""The `motion` topic: the camera's rotation as the robot measures it, for the tracker.

A robot that knows how its camera turns (an IMU, wheel odometry) publishes it on
`{prefix}/{device_id}/motion` (the one unnamed camera) or `{prefix}/{device_id}/motion/{camera}`
(a camera of `sources:`), at its sensor's rate (30-200 Hz), QoS 0, not retained:
`{"v": 1, "wx": .., "wy": .., "wz": .., "focal_px": .., "ts": ..}`: the angular velocity
(rad/s) in the camera's optical frame (x right, y down, z forward), the focal length in
pixels and, optionally, when it was measured (unix s). The tracker uses the newest one while
it is fresh (edge.tracking.motion.RobotMotion, config `track.motion`).

Only the newest message counts, so there is no queue and no rate limit: paho's network thread
checks each message here and hands it on at once (microseconds: at most MAX_BYTES of JSON,
five keys). A message that is none (too large, not JSON, a key missing or out of range,
retained, for a camera the device does not have) is counted (`counts()`, and the camera's
RobotMotion `rejected`) and each cause is logged once, with the topic and the fix: a robot
that sends a bad message 100 times a second writes one line, not 100 a second.
"""

import logging
import math

from edge import peertext, schemas
from edge.tracking.motion import robot_motion

logger = logging.getLogger(__name__)

MAX_BYTES = 4096            # a message is about 100 bytes
MAX_RATE = 50.0             # rad/s (8 turns a second): faster than any camera mount turns
MIN_FOCAL_PX = 1.0          # pixels (a fisheye 640 pixels wide has about 200)
MAX_FOCAL_PX = 100000.0     # pixels (a 400 mm lens on a 4K sensor is about 10000)
RATES = ("wx", "wy", "wz")
EXAMPLE = '{"v": 1, "wx": 0.0, "wy": 0.35, "wz": 0.0, "focal_px": 600.0}'


class MotionRefused(Exception):
    """A message that is no camera motion: `cause` (one per kind of problem, what is logged
    once) and the message for people."""

    def __init__(self, cause, message):
        super().__init__(message)
        self.cause = cause


def _number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and \
        math.isfinite(value)


def parse(raw, size=None):
    """(wx, wy, wz, focal_px) floats of a raw `motion` payload (bytes); MotionRefused naming
    the problem. `size`: the payload's real size when `raw` is only its beginning."""
    size = len(raw) if size is None else size
    if size > MAX_BYTES:
        raise MotionRefused("too_large", "{} bytes; a motion message is at most {}".format(
            size, MAX_BYTES))
    try:
        payload = schemas.loads(raw)
    except ValueError as e:
        raise MotionRefused("bad_json", "not UTF-8 JSON ({})".format(e))
    if not isinstance(payload, dict):
        raise MotionRefused("bad_json", "not a JSON object; send " + EXAMPLE)
    if payload.get("v") != 1 or isinstance(payload.get("v"), bool):
        raise MotionRefused("version", "`v` must be 1 (got {}); send {}".format(
            peertext.text(payload.get("v"), 40), EXAMPLE))
    values = []
    for key in RATES + ("focal_px",):
        if key not in payload:
            raise MotionRefused("missing " + key, "`{}` is missing; send {}".format(
                key, EXAMPLE))
        value = payload[key]
        if key == "focal_px":
            good = _number(value) and MIN_FOCAL_PX <= value <= MAX_FOCAL_PX
            wanted = "the focal length in pixels, a number from {:.0f} to {:.0f}".format(
                MIN_FOCAL_PX, MAX_FOCAL_PX)
        else:
            good = _number(value) and -MAX_RATE <= value <= MAX_RATE
            wanted = "rad/s, a number from {0:.0f} to {1:.0f}".format(-MAX_RATE, MAX_RATE)
        if not good:
            raise MotionRefused("bad " + key, "`{}` must be {} (got {})".format(
                key, wanted, peertext.text(value, 40)))
        values.append(float(value))
    ts = payload.get("ts")
    if ts is not None and not (_number(ts) and 0 <= ts <= peertext.LATEST):
        raise MotionRefused("bad ts", "`ts` must be unix seconds, a number from 0 to {:.0e}, "
                            "or left out (got {})".format(peertext.LATEST,
                                                          peertext.text(ts, 40)))
    return tuple(values)


class MotionInput:
    """Takes the `motion` topic's messages to the cameras' RobotMotion. `link`: the MqttLink
    (its topics); `cameras`: a callable giving the device's camera names now ([None]: the
    one unnamed camera), read on every message (a reload may change them)."""

    def __init__(self, link, cameras):
        self.link = link
        self.cameras = cameras
        self.accepted = 0
        self.rejected = 0           # every message refused, those below included
        self.unknown_camera = 0     # messages for a camera the device does not have
        self.last_error = None      # why the latest refused message was refused
        self._logged = set()        # causes logged (each once)

    def counts(self):
        """For health: messages taken, refused, refused for a camera the device lacks, and
        why the latest was refused (None when none was)."""
        return {"accepted": self.accepted, "rejected": self.rejected,
                "unknown_camera": self.unknown_camera, "last_error": self.last_error}

    def submit(self, camera, payload, retained=False, size=None):
        """One message of `motion` (camera None) or `motion/{camera}` (called from paho's
        thread: never raises, never waits)."""
        try:
            self._take(camera, payload, retained, size)
        except Exception:   # a bug: never let it end paho's network thread
            logger.exception("motion message failed")

    def _take(self, camera, payload, retained, size):
        topic = self.link.topic("motion" if camera is None else "motion/" + camera)
        names = self.cameras()
        if camera not in names:
            self.unknown_camera += 1
            self._refuse(topic, None, "unknown_camera", self._camera_problem(camera, names))
            return
        robot = robot_motion(camera)
        if retained:
            # A retained rotation would be taken again on every connect, seconds or days
            # after the robot measured it: motion is a live message only.
            self._refuse(topic, robot, "retained", "motion must not be retained; publish "
                         "without the retain flag and clear it with mosquitto_pub -r -n "
                         "-t {}".format(peertext.text(topic)))
            return
        try:
            wx, wy, wz, focal_px = parse(payload, size)
        except MotionRefused as e:
            self._refuse(topic, robot, e.cause, str(e))
            return
        robot.put(wx, wy, wz, focal_px)
        self.accepted += 1

    def _camera_problem(self, camera, names):
        named = [n for n in names if n is not None]
        if camera is None:
            return "this device's cameras are named ({}): publish on {}".format(
                ", ".join(named), self.link.topic("motion/<camera>"))
        if not named:
            return "this device has no camera '{}', only one unnamed camera: publish on " \
                   "{}".format(peertext.text(camera, 64), self.link.topic("motion"))
        return "this device has no camera '{}'; its cameras: {}".format(
            peertext.text(camera, 64), ", ".join(named))

    def _refuse(self, topic, robot, cause, reason):
        self.rejected += 1
        self.last_error = "{}: {}".format(peertext.text(topic), reason)
        if robot is not None:
            robot.reject(reason)
        if cause not in self._logged:
            self._logged.add(cause)
            logger.warning("motion: ignored a message on %s: %s (each kind of problem is "
                           "logged once; later ones are counted)", peertext.text(topic),
                           reason)
