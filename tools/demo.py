"""The demo behind tools/demo: real images -> edge run -> MQTT -> what a robot receives.

Fetches the pinned demo images and the model (mirror-aware), starts a local Mosquitto on a
free port (unless --mqtt is given), subscribes as a robot would (edge.client), runs `edge run` on
the images, prints every message received and writes annotated pictures to demo-out/. Then tracks
the objects of a clip panning over two of the images (track ids through the camera's motion,
a zone, a line, events),
matches a stereo pair with the matcher and draws reference and frame side by side with
the matches, and runs stereo depth on the same pair: the motorcycle's distance and a
depth picture.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

from edge import draw, fetch  # noqa: E402
import pan_clip  # noqa: E402  (tools/, beside this file)
from edge.bench.replay import start_local_broker  # noqa: E402
from edge.client import TOPICS, Client  # noqa: E402


def fetch_images(folder, mirror, section="images"):
    with open(os.path.join(ROOT, "tools", "demo-images.yaml")) as f:
        manifest = yaml.safe_load(f)[section]
    os.makedirs(folder, exist_ok=True)
    for item in manifest:
        fetch.fetch(item["url"], item["sha256"], os.path.join(folder, item["file"]),
                    mirror=mirror, what="demo image")
    return [item["file"] for item in manifest]


def subscribe(url, device):
    """A robot-side subscriber on edge.client: every topic of the device, each message
    printed as it arrives (from the client's thread); returns the client."""
    def show(message):
        if message.kind == "detections":
            dets = ", ".join("{} {:.2f}".format(d.label, d.score)
                             for d in message.detections) or "nothing"
            print("  {}  seq {}  {}: {}".format(message.topic, message.seq, message.frame.name,
                                                 dets))
        else:
            print("  {}  {}".format(message.topic, json.dumps(message.payload)[:160]))
    client = Client(url, devices=[device], topics=TOPICS)
    for topic in TOPICS:
        client.on(topic, show)
    return client.start()


def contact_sheet(pictures, width=1280):
    """The annotated pictures in one image, rows of 4."""
    tiles = []
    for pic in pictures:
        scale = 320.0 / pic.shape[1]
        tile = cv2.resize(pic, (320, int(pic.shape[0] * scale)))
        canvas = np.zeros((320, 320, 3), np.uint8)
        canvas[:min(320, tile.shape[0])] = tile[:320]
        tiles.append(canvas)
    while len(tiles) % 4:
        tiles.append(np.zeros((320, 320, 3), np.uint8))
    rows = [np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)]
    return np.vstack(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqtt", help="use this broker instead of starting a local one")
    parser.add_argument("--out", default=os.path.join(ROOT, "demo-out"))
    parser.add_argument("--detector", default="yolox-nano")
    parser.add_argument("--no-matcher", action="store_true", help="skip the matching demo")
    parser.add_argument("--no-depth", action="store_true", help="skip the stereo depth demo")
    args = parser.parse_args()

    data_mirror = os.environ.get("EDGE_DATA_MIRROR") or (
        os.path.join(SHARED, "data") if os.path.isdir(os.path.join(SHARED, "data")) else None)
    images = os.path.join(args.out, "images")
    names = fetch_images(images, data_mirror or "")
    print("demo: {} images in {}".format(len(names), images))

    broker, url = None, args.mqtt
    workdir = tempfile.mkdtemp(prefix="edge-demo-")
    if url is None:
        broker, url = start_local_broker(workdir)
        if url is None:
            print("demo: mosquitto is not installed: running with the JSONL sink only "
                  "(install it with: sudo apt-get install mosquitto)")
    jsonl = os.path.join(args.out, "messages.jsonl")
    if os.path.exists(jsonl):
        os.unlink(jsonl)
    client = None
    try:
        cmd = [sys.executable, "-m", "edge", "run", "--source", images, "--detector",
               args.detector, "--device-id", "demo", "--jsonl", jsonl]
        if url:
            print("demo: broker {}; a robot subscribed to edge/demo/... (edge.client) "
                  "receives:".format(url))
            client = subscribe(url, "demo")
            cmd += ["--mqtt", url + "?qos=1"]
        rc = subprocess.call(cmd)
        if rc != 0:
            print("demo: edge run failed with exit status {}".format(rc))
            return rc
        time.sleep(0.5)
    finally:
        if client is not None:
            client.close()
        if broker is not None:
            broker.terminate()
        shutil.rmtree(workdir, ignore_errors=True)

    with open(jsonl) as f:
        messages = [json.loads(line) for line in f]
    annotated = os.path.join(args.out, "annotated")
    os.makedirs(annotated, exist_ok=True)
    pictures = []
    for message in messages:
        image = cv2.imread(os.path.join(images, message["frame"]["name"]))
        draw.detections(image, message["detections"])
        cv2.imwrite(os.path.join(annotated, message["frame"]["name"]), image)
        pictures.append(image)
    sheet = os.path.join(args.out, "annotated.jpg")
    cv2.imwrite(sheet, contact_sheet(pictures))
    total = sum(len(m["detections"]) for m in messages)
    print("demo: {} messages, {} detections; annotated picture: {} (one per image in {})".format(
        len(messages), total, sheet, annotated))
    rc = demo_tracking(args, images)
    if rc != 0:
        return rc
    if not args.no_matcher:
        rc = demo_matching(args, data_mirror)
        if rc:
            return rc
    return 0 if args.no_depth else demo_depth(args, data_mirror)


def demo_tracking(args, images):
    """A clip panning over the giraffe and the zebra: track ids, a zone, a line, events."""
    clip = os.path.join(args.out, "pan.avi")
    frames = pan_clip.make(clip, [os.path.join(images, "000000000025.jpg"),
                                  os.path.join(images, "000000000034.jpg")])
    config = os.path.join(args.out, "track.yaml")
    with open(config, "w") as f:
        f.write(pan_clip.TRACK_CONFIG)
    jsonl = os.path.join(args.out, "tracking.jsonl")
    if os.path.exists(jsonl):
        os.unlink(jsonl)
    print("demo: tracking the objects of a {}-frame clip panning over two images ({}); the "
          "left half is a zone, its edge a line; the animals stand still, the camera "
          "moves".format(frames, clip))
    rc = subprocess.call([sys.executable, "-m", "edge", "run", "-c", config, "--source", clip,
                          "--detector", args.detector, "--device-id", "demo", "--jsonl", jsonl])
    if rc != 0:
        print("demo: edge run (tracking) failed with exit status {}".format(rc))
        return rc
    with open(jsonl) as f:
        messages = [json.loads(line) for line in f]
    for event in (m for m in messages if "type" in m):
        print("  event  frame {:3d}  track {}  {:8} {}{}".format(
            event["frame_index"], event["track_id"], event["label"], event["type"],
            "".join(" " + str(event[k]) for k in ("zone", "line", "direction") if k in event)))
    results = [m for m in messages if "detections" in m]
    capture = cv2.VideoCapture(clip)
    pictures = []
    for index, message in enumerate(results):
        ok, image = capture.read()
        if not ok:
            break
        if index % (len(results) // 8) == 0 and len(pictures) < 8:
            height, width = image.shape[:2]
            cv2.line(image, (width // 2, 0), (width // 2, height), (255, 200, 0), 2)
            draw.detections(image, message["detections"])
            cv2.putText(image, "frame {}".format(index), (10, 25), cv2.FONT_HERSHEY_SIMPLEX,
                        0.8, (255, 255, 255), 2, cv2.LINE_AA)
            pictures.append(image)
    capture.release()
    sheet = os.path.join(args.out, "tracking.jpg")
    cv2.imwrite(sheet, contact_sheet(pictures))
    ids = sorted({d["track_id"] for m in results for d in m["detections"] if d["track_id"]})
    print("demo: {} frames, track ids {}; picture with the ids drawn: {}".format(
        len(results), ids, sheet))
    # camera motion compensation: the pan is the camera's, so the animals keep their ids,
    # enter the zone (a region of the picture) and cross no line (they do not move)
    shifts = [m["camera_motion"]["dx"] for m in results if m.get("camera_motion")]
    if shifts:
        print("demo: the camera's motion, estimated in {} of {} frames: the picture moved "
              "{:.1f} px a frame on average (dx); no line crossed: {}".format(
                  len(shifts), len(results), sum(shifts) / len(shifts),
                  not any(m.get("type") == "line_cross" for m in messages)))
    return 0


def demo_matching(args, data_mirror):
    """The matcher: a stereo pair, left as the reference, right as the live frame."""
    folder = os.path.join(args.out, "pair")
    left, right = (os.path.join(folder, n) for n in fetch_images(folder, data_mirror or "",
                                                                   "pair"))
    jsonl = os.path.join(args.out, "matches.jsonl")
    if os.path.exists(jsonl):
        os.unlink(jsonl)
    print("demo: matching {} (reference) against {} (frame)".format(
        os.path.basename(left), os.path.basename(right)))
    rc = subprocess.call([sys.executable, "-m", "edge", "run", "--matcher", "coarse-loftr",
                          "--reference", left, "--source", right, "--device-id", "demo",
                          "--state-dir", os.path.join(args.out, "state"), "--jsonl", jsonl])
    if rc != 0:
        print("demo: edge run (matcher) failed with exit status {}".format(rc))
        return rc
    with open(jsonl) as f:
        message = json.loads(f.readline())
    picture = draw.matches(cv2.imread(left), cv2.imread(right), message["matches"],
                           message["homography"])
    path = os.path.join(args.out, "matches.jpg")
    cv2.imwrite(path, picture)
    print("demo: {} matches, {} inliers, homography {}; picture: {}".format(
        message["count"], message["inliers"],
        "found" if message["homography"] else "none", path))
    return 0


# The calibration of the down-sampled Middlebury 2014 motorcycle pair as scikit-image documents
# it for `stereo_motorcycle` (focal length, principal point, doffs, baseline), in Middlebury's
# calib.txt format: cam1's cx = cam0's cx + doffs.
MOTORCYCLE_CALIB = """cam0=[994.978 0 311.193; 0 994.978 254.877; 0 0 1]
cam1=[994.978 0 342.279; 0 994.978 254.877; 0 0 1]
doffs=31.086
baseline=193.001
width=741
height=500
ndisp=80
"""


def demo_depth(args, data_mirror):
    """Stereo depth on the pair: detections with spatial coordinates and a depth picture."""
    from urllib.parse import urlencode
    folder = os.path.join(args.out, "pair")
    left, right = (os.path.join(folder, n) for n in fetch_images(folder, data_mirror or "",
                                                                   "pair"))
    calib = os.path.join(folder, "calib.txt")
    with open(calib, "w") as f:
        f.write(MOTORCYCLE_CALIB)
    jsonl = os.path.join(args.out, "depth.jsonl")
    if os.path.exists(jsonl):
        os.unlink(jsonl)
    state = os.path.join(args.out, "state")
    print("demo: stereo depth of {} and {}".format(os.path.basename(left),
                                                   os.path.basename(right)))
    source = "stereo://?" + urlencode({"left": left, "right": right})
    rc = subprocess.call([sys.executable, "-m", "edge", "run", "--source", source, "--calib",
                          calib, "--detector", args.detector, "--device-id", "demo",
                          "--state-dir", state, "--jsonl", jsonl])
    depth_file = os.path.join(args.out, "depth.npy")
    if rc == 0:
        rc = subprocess.call([sys.executable, "-m", "edge", "depth", left, right, "--calib",
                              calib, "--out", depth_file, "--state-dir", state])
    if rc != 0:
        print("demo: stereo depth failed with exit status {}".format(rc))
        return rc
    with open(jsonl) as f:
        message = json.loads(f.readline())
    depth_mm = np.nan_to_num(np.load(depth_file), nan=0.0)
    image = cv2.imread(left)
    draw.detections(image, message["detections"])
    for det in message["detections"]:
        spatial = det.get("spatial")
        if spatial is None:
            continue
        text = "{:.0f} mm".format(spatial["z"])     # mm, as the messages carry it
        x1, y1, x2, y2 = (int(v) for v in det["box"])
        cv2.putText(image, text, (x1 + 4, y2 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                    (255, 255, 255), 2, cv2.LINE_AA)
        print("demo: {} {:.2f} at x {:.0f} mm, y {:.0f} mm, z {:.0f} mm".format(
            det["label"], det["score"], spatial["x"], spatial["y"], spatial["z"]))
    picture = np.hstack([image, draw.depth(depth_mm)])
    path = os.path.join(args.out, "depth.jpg")
    cv2.imwrite(path, picture)
    print("demo: depth map {} ({:.0%} of pixels with a depth); picture: {}".format(
        depth_file, float((depth_mm > 0).mean()), path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
