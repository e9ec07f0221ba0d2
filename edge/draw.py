"""Annotated pictures: detections and matches drawn onto frames (demo, snapshots)."""

import cv2
import numpy as np


def _colour(class_id):
    """A stable, distinct BGR colour per class."""
    hue = (class_id * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def detections(image, dets):
    """Draw boxes and labels (as published: dicts with box, label, score and track_id) onto
    `image`; a tracked object is labelled `#id` and keeps its colour from frame to frame."""
    thickness = max(1, int(round(max(image.shape[:2]) / 400)))
    for det in dets:
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        track = det.get("track_id")
        colour = _colour(det.get("class_id", 0) if track is None else track * 7 + 3)
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness)
        text = "{} {:.2f}".format(det["label"], det["score"])
        if track is not None:
            text = "#{} {}".format(track, text)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(y1, th + base + 2)
        cv2.rectangle(image, (x1, top - th - base - 2), (x1 + tw + 2, top), colour, -1)
        cv2.putText(image, text, (x1 + 1, top - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return image


def matches(reference, frame, pairs, homography=None, inliers=None):
    """Reference and frame side by side with a line per match; returns the new picture.

    `pairs` rows are [x_ref, y_ref, x_cur, y_cur, score] in each image's own pixels.
    """
    height = max(reference.shape[0], frame.shape[0])
    canvas = np.zeros((height, reference.shape[1] + frame.shape[1], 3), np.uint8)
    canvas[:reference.shape[0], :reference.shape[1]] = reference
    canvas[:frame.shape[0], reference.shape[1]:] = frame
    shift = reference.shape[1]
    for i, (xr, yr, xc, yc, score) in enumerate(pairs):
        good = inliers is None or inliers[i]
        colour = (0, 220, 0) if good else (0, 0, 220)
        cv2.line(canvas, (int(xr), int(yr)), (int(xc) + shift, int(yc)), colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, (int(xr), int(yr)), 2, colour, -1)
        cv2.circle(canvas, (int(xc) + shift, int(yc)), 2, colour, -1)
    if homography is not None:
        h, w = reference.shape[:2]
        corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]).reshape(-1, 1, 2)
        warped = cv2.perspectiveTransform(corners, np.float64(homography).reshape(3, 3))
        cv2.polylines(canvas, [np.int32(warped + [shift, 0])], True, (255, 200, 0), 2)
    return canvas


def match_overlay(image, message):
    """The frame side of a `matches` message: matched points and the reference's outline."""
    for row in message["matches"]:
        cv2.circle(image, (int(row[2]), int(row[3])), 3, (0, 220, 0), -1)
    if message.get("homography"):
        ref = message["reference"]
        corners = np.float32([[0, 0], [ref["width"], 0], [ref["width"], ref["height"]],
                              [0, ref["height"]]]).reshape(-1, 1, 2)
        warped = cv2.perspectiveTransform(corners, np.float64(message["homography"]).reshape(3, 3))
        cv2.polylines(image, [np.int32(warped)], True, (255, 200, 0), 2)
        cv2.putText(image, ref["name"], tuple(int(v) for v in warped[0, 0]),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 200, 0), 2, cv2.LINE_AA)
    return image


def depth(depth_mm, min_mm=None, max_mm=None):
    """A depth map (mm, 0 unknown) as a BGR picture: near warm, far cool, unknown black.

    Colours follow inverse depth, as disparity does, so nearby detail gets the most of them;
    the range is [min_mm, max_mm], by default the map's own 2nd to 98th percentile.
    """
    known = depth_mm > 0
    inverse = np.zeros(depth_mm.shape, np.float32)
    np.divide(1.0, depth_mm, out=inverse, where=known)
    if known.any() and (min_mm is None or max_mm is None):
        low, high = np.percentile(depth_mm[known], [2, 98])
        min_mm = low if min_mm is None else min_mm
        max_mm = high if max_mm is None else max_mm
    near, far = 1.0 / max(min_mm or 1.0, 1.0), 1.0 / max(max_mm or 2.0, 2.0)
    level = np.clip((inverse - far) / max(near - far, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    # TURBO from OpenCV 4.1.2; JetPack 4's 4.1.1 has JET.
    picture = cv2.applyColorMap(level, getattr(cv2, "COLORMAP_TURBO", cv2.COLORMAP_JET))
    picture[~known] = 0
    return picture
