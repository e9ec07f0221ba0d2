"""tools/ros2_bridge.py's conversion, without ROS: real daemons' messages (tests/recorded.py)
into stand-ins of the ROS message classes with the fields of vision_msgs 4.x (Humble and
later) and 2.x (Foxy), whose setters check types as rclpy's generated classes do (a float64
field takes only a float). The node itself (`main`) needs ROS 2 and is not tested here."""

import json
import os
import sys
import types

import pytest

from edge import client as edge_client
from tests import recorded
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ros2_bridge  # noqa: E402  (tools/)


class Typed:
    """A field of a stand-in message: its type checked on assignment, as rclpy does."""

    def __init__(self, kind, default=None):
        self.kind, self.default = kind, default

    def __set_name__(self, owner, name):
        self.name = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.name)

    def __set__(self, obj, value):
        kind = self.kind
        if isinstance(kind, list):      # a sequence of messages
            ok = isinstance(value, list) and all(isinstance(v, kind[0]) for v in value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise AssertionError("The '{}' field must be of type '{}'".format(
                self.name[1:], getattr(kind, "__name__", kind)))
        setattr(obj, self.name, value)

    def initial(self):
        if self.default is not None:
            return self.default
        if isinstance(self.kind, list):
            return []
        return self.kind()


def message(name, **fields):
    """A stand-in message class: fields default as in ROS (0, 0.0, '', False, [], nested
    messages default-constructed)."""
    def __init__(self):
        for field in fields:
            setattr(self, field, getattr(type(self), field).initial())
    namespace = {"__init__": __init__}
    for field, spec in fields.items():
        namespace[field] = spec if isinstance(spec, Typed) else Typed(spec)
    return type(name, (), namespace)


# std_msgs, builtin_interfaces, geometry_msgs, sensor_msgs (the fields the bridge meets)
Time = message("Time", sec=int, nanosec=int)
Header = message("Header", stamp=Time, frame_id=str)
String = message("String", data=str)
Point = message("Point", x=float, y=float, z=float)
Quaternion = message("Quaternion", x=float, y=float, z=float, w=Typed(float, 1.0))
Pose = message("Pose", position=Point, orientation=Quaternion)
PoseWithCovariance = message("PoseWithCovariance", pose=Pose, covariance=list)
Vector3 = message("Vector3", x=float, y=float, z=float)
GeometryPose2D = message("Pose2D", x=float, y=float, theta=float)
Image = message("Image", height=int, width=int, encoding=str)
PointCloud2 = message("PointCloud2", height=int, width=int)
BoundingBox3D = message("BoundingBox3D", center=Pose, size=Vector3)



def vision(hypothesis, detection2d, detection3d):
    """The classes the bridge takes, for one vision_msgs layout."""
    return types.SimpleNamespace(
        ObjectHypothesisWithPose=hypothesis, Detection2D=detection2d, Detection3D=detection3d,
        Detection2DArray=message("Detection2DArray", header=Header, detections=[detection2d]),
        Detection3DArray=message("Detection3DArray", header=Header, detections=[detection3d]),
        String=String)


# vision_msgs 4.x (Humble, Iron, Jazzy, Rolling)
Point2D = message("Point2D", x=float, y=float)
VisionPose2D = message("Pose2D", position=Point2D, theta=float)
ObjectHypothesis = message("ObjectHypothesis", class_id=str, score=float)
Hypothesis4 = message("ObjectHypothesisWithPose", hypothesis=ObjectHypothesis,
                      pose=PoseWithCovariance)
BoundingBox2D4 = message("BoundingBox2D", center=VisionPose2D, size_x=float, size_y=float)
Detection2D4 = message("Detection2D", header=Header, results=[Hypothesis4], bbox=BoundingBox2D4,
                       id=str)
Detection3D4 = message("Detection3D", header=Header, results=[Hypothesis4], bbox=BoundingBox3D,
                       id=str)
VISION_4 = vision(Hypothesis4, Detection2D4, Detection3D4)

# vision_msgs 2.x (Foxy: JetPack 5's Ubuntu 20.04)
Hypothesis2 = message("ObjectHypothesisWithPose", id=str, score=float, pose=PoseWithCovariance)
BoundingBox2D2 = message("BoundingBox2D", center=GeometryPose2D, size_x=float, size_y=float)
Detection2D2 = message("Detection2D", header=Header, results=[Hypothesis2], bbox=BoundingBox2D2,
                       source_img=Image, is_tracking=bool, tracking_id=str)
Detection3D2 = message("Detection3D", header=Header, results=[Hypothesis2], bbox=BoundingBox3D,
                       source_cloud=PointCloud2, is_tracking=bool, tracking_id=str)
VISION_2 = vision(Hypothesis2, Detection2D2, Detection3D2)
LAYOUTS = {"vision_msgs-4": VISION_4, "vision_msgs-2": VISION_2}


@pytest.fixture(scope="module")
def messages(tmp_path_factory, model_dir):
    recorded_messages = recorded.record(str(tmp_path_factory.mktemp("recorded")), model_dir)
    return {run: {topic: [edge_client.parse(topic, p) for p in payloads]
                  for topic, payloads in by_topic.items()}
            for run, by_topic in recorded_messages.items()}


def label_and_score(hypothesis):
    if hasattr(hypothesis, "hypothesis"):
        return hypothesis.hypothesis.class_id, hypothesis.hypothesis.score
    return hypothesis.id, hypothesis.score


def track_of(detection):
    if hasattr(detection, "tracking_id"):
        assert detection.is_tracking == (detection.tracking_id != "")
        return detection.tracking_id
    return detection.id


def center_of(bbox):
    center = bbox.center
    return (center.position.x, center.position.y) if hasattr(center, "position") else (
        center.x, center.y)


def check_header(header, message, frame):
    assert header.frame_id == frame
    assert header.stamp.sec + header.stamp.nanosec * 1e-9 == pytest.approx(message.frame.ts,
                                                                           abs=1e-6)
    assert 0 <= header.stamp.nanosec < 10 ** 9


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_detections_become_a_detection2d_array(messages, layout):
    """Every detection of the panning clip: label, score, box centre and size in pixels,
    the track id (empty until confirmed), the frame's capture time and the frame id."""
    vision = LAYOUTS[layout]
    tracked = 0
    for message in messages["pan"]["detections"]:
        array = ros2_bridge.detections_2d(vision, message)
        check_header(array.header, message, "clip_camera_optical")
        assert len(array.detections) == len(message.detections)
        for out, d in zip(array.detections, message.detections):
            assert out.header is array.header
            assert [label_and_score(h) for h in out.results] == [(d.label, d.score)]
            x1, y1, x2, y2 = d.box
            assert center_of(out.bbox) == pytest.approx(((x1 + x2) / 2, (y1 + y2) / 2))
            assert (out.bbox.size_x, out.bbox.size_y) == pytest.approx((x2 - x1, y2 - y1))
            assert track_of(out) == ("" if d.track_id is None else str(d.track_id))
            tracked += d.track_id is not None
    assert tracked > 10


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_spatial_detections_become_a_detection3d_array_in_metres(messages, layout):
    vision = LAYOUTS[layout]
    (message,) = messages["stereo"]["detections"]
    located = [d for d in message.detections if d.spatial is not None]
    assert located
    array = ros2_bridge.detections_3d(vision, message, "{device}_left_optical")
    check_header(array.header, message, "stereo_left_optical")
    assert len(array.detections) == len(located)
    for out, d in zip(array.detections, located):
        position = out.bbox.center.position
        assert (position.x, position.y, position.z) == pytest.approx(
            (d.spatial.x / 1000, d.spatial.y / 1000, d.spatial.z / 1000))
        assert out.results[0].pose.pose.position.z == position.z
        assert out.bbox.center.orientation.w == 1.0
        assert label_and_score(out.results[0]) == (d.label, d.score)
    motorcycle = [out for out, d in zip(array.detections, located) if d.label == "motorcycle"]
    assert motorcycle[0].bbox.center.position.z == pytest.approx(2.38, abs=0.1)   # ground truth


def test_no_spatial_no_detection3d_array(messages):
    for message in messages["pan"]["detections"]:
        assert ros2_bridge.detections_3d(VISION_4, message) is None


def test_events_become_strings_of_their_json(messages):
    events = messages["pan"]["events"]
    assert {"track_start", "line_cross", "zone_enter"} <= {e.type for e in events}
    for event in events:
        assert json.loads(ros2_bridge.event_string(VISION_4, event).data) == event.payload


@pytest.mark.parametrize("name, token", [("cam1", "cam1"), ("cam-1", "cam_1"),
                                         ("front.left", "front_left"), ("1st", "n1st"),
                                         ("a--b__c", "a_b_c"), ("-", "unnamed")])
def test_device_and_camera_names_become_ros_names(name, token):
    assert ros2_bridge.ros_name(name) == token


def test_cameras_get_their_own_namespace(messages):
    message = messages["pan"]["detections"][0]
    assert ros2_bridge.namespace(message) == "/edge/clip"
    front = message._replace(camera="front-left", device="robot-7")
    assert ros2_bridge.namespace(front) == "/edge/robot_7/front_left"
    assert ros2_bridge.frame_id("{device}_{camera}_optical", front) == \
        "robot_7_front_left_optical"


class Node:
    """Stands in for rclpy's Node: create_publisher returns a publisher that records."""

    def __init__(self):
        self.published = []

    def create_publisher(self, msg_type, name, depth):
        node = self

        class Publisher:
            def publish(self, msg):
                assert isinstance(msg, msg_type)
                node.published.append((name, msg))
        return Publisher()


def test_the_bridge_routes_each_message_to_its_topics(messages):
    node = Node()
    bridge = ros2_bridge.Bridge(node, VISION_4)
    bridge.on_detections(messages["stereo"]["detections"][0])
    bridge.on_detections(messages["pan"]["detections"][0])
    bridge.on_event(messages["pan"]["events"][0])
    assert [name for name, _ in node.published] == [
        "/edge/stereo/detections", "/edge/stereo/detections_3d", "/edge/clip/detections",
        "/edge/clip/events"]
    assert sorted(bridge.publishers) == ["/edge/clip/detections", "/edge/clip/events",
                                         "/edge/stereo/detections",
                                         "/edge/stereo/detections_3d"]


def test_the_bridge_imports_no_ros_until_it_runs():
    assert "rclpy" not in sys.modules and "vision_msgs" not in sys.modules
