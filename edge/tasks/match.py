"""Feature matching: reference image <-> live frame, verified by a RANSAC homography.

The graph (family `loftr-coarse`) returns, per reference cell, its best frame cell and the
confidence of mutual nearest neighbours above the card's threshold. Here the cells become
pixel coordinates in each image, OpenCV fits the homography reference -> frame, and the best
`top_k` matches are published with the full count.
"""

import logging
import time

import numpy as np

from edge import nodes
from edge.errors import SourceError
from edge.families.loftr import MATCHES, STRIDE
from edge.tasks import register
from edge.tasks.base import Task
from edge.validate import Field

logger = logging.getLogger(__name__)

MIN_POINTS = 4       # a homography needs four correspondences
# edge doctor: the share of the reference's mutual-NN pairs an engine must find (the FP16-safe
# matcher keeps 0.99-1.0 of them in CI's FP16 emulation, tests/test_fp16.py; the unsafe one
# kept 0.85)
MATCH_AGREEMENT = 0.95


def cell_centres(card, width, height):
    """(N, 2) float32 pixel coordinates, in an image of width x height, of every coarse cell.

    A cell of the network input covers STRIDE x STRIDE pixels; its centre is mapped back
    through the card's resize (and letterbox padding) into the image's own pixels.
    """
    geometry = nodes.Geometry(card, width, height)
    columns, rows = geometry.net_w // STRIDE, geometry.net_h // STRIDE
    index = np.arange(columns * rows)
    u = (index % columns) * STRIDE + STRIDE / 2.0
    v = (index // columns) * STRIDE + STRIDE / 2.0
    x = (u - geometry.pad_x) / geometry.sx
    y = (v - geometry.pad_y) / geometry.sy
    return np.stack([x, y], axis=1).astype(np.float32)


def pairs_to_rows(pairs, ref_centres, cur_centres):
    """(n, 5) float32 rows x_ref, y_ref, x_cur, y_cur, score of the matches, best first."""
    score = pairs[:, 1]
    index = np.flatnonzero(score > 0)
    index = index[np.argsort(-score[index], kind="stable")]
    best = pairs[index, 0].astype(np.int64)
    out = np.empty((index.size, 5), np.float32)
    out[:, 0:2] = ref_centres[index]
    out[:, 2:4] = cur_centres[best]
    out[:, 4] = score[index]
    return out


def verify(rows, ransac_px, min_inliers):
    """(homography 3x3 or None, inlier mask) from a RANSAC fit reference -> frame."""
    mask = np.zeros(rows.shape[0], bool)
    if rows.shape[0] < MIN_POINTS:
        return None, mask
    import cv2      # here: a daemon without a matcher never loads OpenCV
    h, inliers = cv2.findHomography(rows[:, 0:2], rows[:, 2:4], cv2.RANSAC, ransac_px)
    if h is None or inliers is None:
        return None, mask
    mask = inliers.reshape(-1).astype(bool)
    if int(mask.sum()) < min_inliers:
        return None, mask
    return h, mask


@register
class MatchTask(Task):
    """Matches of each stored reference against the frames it is due on (`matches` topic)."""

    name = "match"
    topic = "matches"
    background = True
    references = True
    frame_copies = 2             # the frame and the reference
    samples = ("motorcycle-right.jpg", "motorcycle-left.jpg")
    thresholds = {
        "score": Field(float, default=0.2, min=0.0, max=1.0),
        "ransac_px": Field(float, default=8.0, min=0.1),
        "min_inliers": Field(int, default=8, min=4),
        "border": Field(int, default=1, min=0),
    }

    @classmethod
    def options(cls, config, maker, store=None, depth=None):
        """The `match` section and the reference store."""
        return dict(super().options(config, maker), store=store, **config["match"])

    @classmethod
    def build_references(cls, store):
        """Every stored reference: an engine is made per reference size."""
        return [store.get(name) for name in store.names()]

    def draw(self, image, message):
        """The matched points and the reference's outline."""
        from edge import draw
        draw.match_overlay(image, message)

    @classmethod
    def reference_sizes(cls, store, width, height):
        """(width, height) of each stored reference, else the frame's: the graph is
        specialised to the size of its reference image."""
        sizes = []
        for image in cls.build_references(store):
            if (image.shape[1], image.shape[0]) not in sizes:
                sizes.append((image.shape[1], image.shape[0]))
        return sizes or [(width, height)]

    @classmethod
    def summarise(cls, card, outputs):
        """The mutual-nearest-neighbour pairs (reference cell, frame cell)."""
        pairs = outputs[MATCHES]
        index = np.flatnonzero(pairs[:, 1] > 0)
        return {"pairs": [[int(i), int(pairs[i, 0])] for i in index]}

    @classmethod
    def compare(cls, card, got, want):
        got_pairs = {tuple(p) for p in got["pairs"]}
        want_pairs = {tuple(p) for p in want["pairs"]}
        agreement = len(got_pairs & want_pairs) / float(max(1, len(want_pairs)))
        return agreement >= MATCH_AGREEMENT, "{} matches, {:.0%} of the reference's {}".format(
            len(got_pairs), agreement, len(want_pairs))

    def __init__(self, card, engines, model, device="edge", store=None, max_hz=1.0, every=0,
                 top_k=500, max_references=4):
        super().__init__(card, engines, model)
        self.device = device
        self.store = store                   # ReferenceStore
        self.max_hz = max_hz                 # 0: every frame (unless `every` is set)
        self.every = every                   # > 0: every N-th frame of the source
        self.top_k = top_k
        self.max_references = max_references
        self._last = {}                      # camera name -> when it was last matched
        self._centres = {}                   # (width, height) -> cell centres
        self._warned = False

    def due(self, frame, now):
        if not self.store or not self.store.names():
            if not self._warned:
                logger.warning("matcher %s: no reference image stored; set one with "
                               "--reference IMAGE or the set_reference command", self.card.name)
                self._warned = True
            return False
        if self.every:
            return frame.index % self.every == 0
        last = self._last.get(frame.camera)
        if last is None or self.max_hz <= 0 or now - last >= 1.0 / self.max_hz:
            self._last[frame.camera] = now      # each camera at max_hz
            return True
        return False

    def build(self, frame):
        for size in self._reference_sizes():
            self.ensure_engine(frame.width, frame.height, size)

    def prepare(self, frame):
        """The engines for the stored references (none yet: built when one is set)."""
        for size in self._reference_sizes():
            self.engine_for(frame.width, frame.height, size)

    def _reference_sizes(self):
        """(width, height) of each stored reference, once each (an unreadable one is skipped)."""
        sizes = []
        for name in self.store.names()[:self.max_references] if self.store else []:
            try:
                reference = self.store.get(name)
            except SourceError as e:
                logger.warning("matcher: %s", e)
                continue
            size = (reference.shape[1], reference.shape[0])
            if size not in sizes:
                sizes.append(size)
        return sizes

    def centres(self, width, height):
        key = (width, height)
        if key not in self._centres:
            self._centres[key] = cell_centres(self.card, width, height)
        return self._centres[key]

    def infer_frame(self, frame):
        """[(reference name, image, binding, infer ms)] for each reference matched."""
        inferred = []
        names = self.store.names()[:self.max_references]
        self._unbind_others(frame, names)
        for name in names:
            try:
                reference = self.store.get(name)
            except SourceError as e:
                logger.warning("matcher: %s", e)
                continue
            engine, binding = self.binding_for(frame, (self.name, name), reference)
            inferred.append((name, reference, binding, self.infer(engine, binding)))
        return inferred

    def _unbind_others(self, frame, names):
        """Drop the slot's bindings of references deleted since it last ran: each holds the
        reference image and its outputs, which would otherwise stay for good."""
        for key in [k for k in frame.outputs
                    if isinstance(k, tuple) and k[0] == self.name and k[1] not in names]:
            del frame.outputs[key]

    def decode(self, frame, inferred):
        messages = [self.message(frame, *item) for item in inferred]
        if messages:
            self.frames += 1
        return messages

    def message(self, frame, name, reference, binding, infer_ms):
        """The `matches` message for one reference and the frame."""
        ref_h, ref_w = reference.shape[:2]
        rows = pairs_to_rows(binding.outputs[MATCHES], self.centres(ref_w, ref_h),
                      self.centres(frame.width, frame.height))
        thresholds = self.card.thresholds
        homography, inliers = verify(rows, thresholds["ransac_px"], thresholds["min_inliers"])
        msg = self.new_message(frame, infer_ms)
        msg["reference"] = {"name": name, "width": ref_w, "height": ref_h}
        msg["count"] = int(rows.shape[0])
        msg["inliers"] = int(inliers.sum())
        msg["homography"] = None if homography is None else [
            round(float(v), 8) for v in homography.reshape(-1)]
        msg["matches"] = [[round(float(v), 2) for v in row[:4]] + [round(float(row[4]), 4)]
                          for row in rows[:self.top_k]]
        msg["latency_ms"]["total"] = round((time.time() - frame.ts) * 1000.0, 3)
        return msg
