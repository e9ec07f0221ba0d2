#!/usr/bin/env python3
"""A ROS 2 node that republishes what edge devices send over MQTT (edge.client) as ROS topics.

    source /opt/ros/humble/setup.bash        # or foxy, galactic, iron, jazzy
    python3 tools/ros2_bridge.py --mqtt mqtt://broker:1883 cam1 [--session NAME]

For each device (and camera, when its sources are named) it publishes
  /edge/{device}[/{camera}]/detections     vision_msgs/Detection2DArray, every detections
                                           message (empty arrays too: nothing seen is news)
  /edge/{device}[/{camera}]/detections_3d  vision_msgs/Detection3DArray, the detections that
                                           have `spatial` (stereo runs), in metres
  /edge/{device}[/{camera}]/events         std_msgs/String, each tracking event's JSON
Names are made ROS-safe (cam-1 -> cam_1). Headers carry the frame's capture time (the
device's clock: keep it synchronised, chrony/NTP) and `--frame-id` ('{device}_camera_optical'
by default; x right, y down, z forward, as `spatial`).

The conversion (everything above `main`) is plain Python that takes the message classes as
arguments, so tests/test_ros2_bridge.py checks it without ROS against stand-ins with the
fields (and rclpy's type checks) of vision_msgs 4.x (Humble and later) and 2.x (Foxy).
`main` and the node need a ROS 2 install with vision_msgs and are NOT tested here.
"""

import argparse
import json
import os
import re
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edge.client import Client  # noqa: E402

DEFAULT_FRAME_ID = "{device}_camera_optical"


def ros_name(text):
    """A ROS 2 name token for a device or camera name: letters, digits and single
    underscores, not starting with a digit."""
    token = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", text)).strip("_") or "unnamed"
    return "n" + token if token[0].isdigit() else token


def namespace(message, root="/edge"):
    """The ROS namespace of a device's (or camera's) topics: /edge/{device}[/{camera}]."""
    parts = [root, ros_name(message.device)]
    if message.camera:
        parts.append(ros_name(message.camera))
    return "/".join(parts)


def frame_id(template, message):
    """The header's frame_id from a template with {device} and {camera}."""
    return template.format(device=ros_name(message.device),
                           camera=ros_name(message.camera) if message.camera else "")


def set_header(header, ts, frame):
    """Stamp a std_msgs/Header with a unix time (s) and a frame id."""
    sec = int(ts)
    header.stamp.sec = sec
    header.stamp.nanosec = min(int(round((ts - sec) * 1e9)), 999999999)
    header.frame_id = frame


def hypothesis(types, label, score):
    """An ObjectHypothesisWithPose naming the label (vision_msgs 3+: `hypothesis.class_id`;
    2.x, Foxy: `id`)."""
    result = types.ObjectHypothesisWithPose()
    if hasattr(result, "hypothesis"):
        result.hypothesis.class_id = label
        result.hypothesis.score = float(score)
    else:
        result.id = label
        result.score = float(score)
    return result


def _track(detection, track_id):
    """The track id on a Detection2D/3D (`id` since vision_msgs 3; `tracking_id` with
    `is_tracking` in 2.x); empty while the track is not confirmed."""
    text = "" if track_id is None else str(track_id)
    if hasattr(detection, "tracking_id"):
        detection.is_tracking = track_id is not None
        detection.tracking_id = text
    else:
        detection.id = text


def detection_2d(types, d, header):
    """A vision_msgs/Detection2D for an edge.client Detection (box centre and size in
    source pixels)."""
    x1, y1, x2, y2 = (float(v) for v in d.box)
    out = types.Detection2D()
    out.header = header
    out.results.append(hypothesis(types, d.label, d.score))
    center = out.bbox.center
    if hasattr(center, "position"):     # vision_msgs/Pose2D (4.x)
        center.position.x, center.position.y = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    else:                               # geometry_msgs/Pose2D (2.x, 3.x)
        center.x, center.y = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    out.bbox.size_x, out.bbox.size_y = x2 - x1, y2 - y1
    _track(out, d.track_id)
    return out


def detections_2d(types, message, frame_template=DEFAULT_FRAME_ID):
    """A vision_msgs/Detection2DArray for an edge.client Detections message."""
    out = types.Detection2DArray()
    set_header(out.header, message.frame.ts, frame_id(frame_template, message))
    out.detections = [detection_2d(types, d, out.header) for d in message.detections]
    return out


def detection_3d(types, d, header):
    """A vision_msgs/Detection3D at a Detection's `spatial` position, in metres. edge sends
    no metric extent, so the box's size is 0 (unknown)."""
    out = types.Detection3D()
    out.header = header
    result = hypothesis(types, d.label, d.score)
    position = result.pose.pose.position
    position.x, position.y, position.z = (d.spatial.x / 1000.0, d.spatial.y / 1000.0,
                                          d.spatial.z / 1000.0)
    out.results.append(result)
    out.bbox.center.position.x = position.x
    out.bbox.center.position.y = position.y
    out.bbox.center.position.z = position.z
    out.bbox.center.orientation.w = 1.0
    _track(out, d.track_id)
    return out


def detections_3d(types, message, frame_template=DEFAULT_FRAME_ID):
    """A vision_msgs/Detection3DArray of the detections with `spatial`, or None when none
    has one (not a stereo run, or no depth for any box)."""
    located = [d for d in message.detections if d.spatial is not None]
    if not located:
        return None
    out = types.Detection3DArray()
    set_header(out.header, message.frame.ts, frame_id(frame_template, message))
    out.detections = [detection_3d(types, d, out.header) for d in located]
    return out


def event_string(types, message):
    """A std_msgs/String holding the event's JSON payload, as edge published it."""
    out = types.String()
    out.data = json.dumps(message.payload, separators=(",", ":"))
    return out


class Bridge:
    """Publishers per namespace, made on first use, fed from edge.client's thread."""

    def __init__(self, node, types, frame_template=DEFAULT_FRAME_ID, depth=10):
        self.node = node
        self.types = types
        self.frame_template = frame_template
        self.depth = depth
        self.publishers = {}
        self.lock = threading.Lock()

    def publisher(self, msg_type, name):
        with self.lock:
            if name not in self.publishers:
                self.publishers[name] = self.node.create_publisher(msg_type, name, self.depth)
            return self.publishers[name]

    def on_detections(self, message):
        base = namespace(message)
        self.publisher(self.types.Detection2DArray, base + "/detections").publish(
            detections_2d(self.types, message, self.frame_template))
        located = detections_3d(self.types, message, self.frame_template)
        if located is not None:
            self.publisher(self.types.Detection3DArray, base + "/detections_3d").publish(
                located)

    def on_event(self, message):
        self.publisher(self.types.String, namespace(message) + "/events").publish(
            event_string(self.types, message))


def main(argv=None):   # untested: needs a ROS 2 install with vision_msgs
    """Run the bridge node until interrupted."""
    import types as pytypes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devices", nargs="*", metavar="DEVICE", help="devices (default: all)")
    parser.add_argument("--mqtt", default="mqtt://localhost:1883", help="broker URL")
    parser.add_argument("--prefix", default="edge", help="MQTT topic prefix")
    parser.add_argument("--camera", action="append", metavar="NAME", help="only these cameras")
    parser.add_argument("--session", help="a persistent MQTT session name: after a restart of "
                                          "the bridge the broker delivers what it missed")
    parser.add_argument("--frame-id", default=DEFAULT_FRAME_ID,
                        help="header frame_id; {device} and {camera} are replaced")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", help="file holding the password")
    parser.add_argument("--ca-file", help="CA certificate for mqtts://")
    args, ros_args = parser.parse_known_args(argv)

    import rclpy
    from rclpy.node import Node
    from std_msgs.msg import String
    from vision_msgs.msg import (Detection2D, Detection2DArray, Detection3D, Detection3DArray,
                                 ObjectHypothesisWithPose)
    types = pytypes.SimpleNamespace(
        Detection2D=Detection2D, Detection2DArray=Detection2DArray, Detection3D=Detection3D,
        Detection3DArray=Detection3DArray, ObjectHypothesisWithPose=ObjectHypothesisWithPose,
        String=String)
    rclpy.init(args=ros_args)
    node = Node("edge_bridge")
    bridge = Bridge(node, types, args.frame_id)
    client = Client(args.mqtt, devices=args.devices or None, topics=["detections", "events"],
                    cameras=args.camera, prefix=args.prefix, session=args.session,
                    username=args.username, password_file=args.password_file,
                    ca_file=args.ca_file)
    client.on("detections", bridge.on_detections).on("events", bridge.on_event)
    client.start(timeout=None)      # a robot may boot before its broker: wait for it
    node.get_logger().info("edge bridge: {} -> /edge/...".format(" ".join(client.subscriptions)))
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        node.destroy_node()
        rclpy.shutdown()


if __name__ == "__main__":
    main()
