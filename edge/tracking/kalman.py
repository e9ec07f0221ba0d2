"""A constant-velocity Kalman filter for boxes, run on all tracks at once.

State per track: centre x, centre y, width and height (the measurement, a box) and their
velocities in pixels per frame. The noise scales with the box (BoT-SORT's width/height form
of ByteTrack's filter): a large box near the camera moves more pixels per frame than a small
one far away. Started, predicted and corrected this way, the four quantities never become
correlated with one another (every matrix of the filter is block-diagonal per quantity), so
the 8 x 8 covariance is four 2 x 2 ones, kept as three arrays: the filter is elementwise
arithmetic, with no matrix inverse (batched solves cost numpy 1.19, JetPack 4.6's, about
0.2 ms a call). Everything lives in arrays of a fixed capacity indexed by track slot.
"""

import numpy as np

POSITION_WEIGHT = 1.0 / 20.0    # std of position noise, as a share of the box size
VELOCITY_WEIGHT = 1.0 / 160.0   # std of velocity noise per frame, as a share of the box size
# A new track's velocity is unknown: its std is half the box's size per frame, so that the
# gate lets a fast object (a robot turning) be followed from its second frame on.
START_VELOCITY = 0.5


class BoxKalman:
    """Per slot (capacity, 4) each: position means (cx, cy, w, h), velocity means, and the
    2 x 2 covariance of every (position, velocity) pair as its three distinct terms."""

    def __init__(self, capacity):
        self.mean = np.zeros((capacity, 8), np.float64)   # cx, cy, w, h, then velocities
        self.var_p = np.zeros((capacity, 4), np.float64)  # variance of the position
        self.cov_pv = np.zeros((capacity, 4), np.float64)  # position-velocity covariance
        self.var_v = np.zeros((capacity, 4), np.float64)  # variance of the velocity

    def start(self, slots, boxes):
        """New tracks in `slots` from boxes (n, 4) x1, y1, x2, y2."""
        z = to_measurement(boxes)
        self.mean[slots, :4] = z
        self.mean[slots, 4:] = 0.0
        size = _sizes(z)
        self.var_p[slots] = (2.0 * POSITION_WEIGHT * size) ** 2
        self.cov_pv[slots] = 0.0
        self.var_v[slots] = (START_VELOCITY * size) ** 2

    def predict(self, slots, steps):
        """Move the tracks in `slots` `steps` frames ahead (steps >= 1: frames a live source
        dropped count as time passing)."""
        if slots.size == 0:
            return
        mean = self.mean[slots]
        size = _sizes(mean)
        mean[:, :4] += steps * mean[:, 4:]
        self.mean[slots] = mean
        var_p, cov_pv, var_v = self.var_p[slots], self.cov_pv[slots], self.var_v[slots]
        # F P F^T + Q with F = [[1, dt], [0, 1]] per quantity
        self.var_p[slots] = var_p + steps * (2.0 * cov_pv + steps * var_v) + \
            steps * (POSITION_WEIGHT * size) ** 2
        self.cov_pv[slots] = cov_pv + steps * var_v
        self.var_v[slots] = var_v + steps * (VELOCITY_WEIGHT * size) ** 2

    def warp(self, slots, motion):
        """Move the tracks in `slots` with the camera: `motion` (2 x 3) maps pixels of the
        previous frame to this one (edge.tracking.motion). Centres and velocities turn,
        scale and (centres) shift; sizes scale. Covariances follow as R P R^T kept on its
        diagonal per quantity (the filter has no x-y terms; a camera turns a degree or two
        per frame, so what is dropped is tiny)."""
        if slots.size == 0:
            return
        linear = motion[:, :2]
        scale = np.sqrt(abs(np.linalg.det(linear)))
        squares = linear * linear
        mean = self.mean[slots]
        mean[:, 0:2] = mean[:, 0:2] @ linear.T + motion[:, 2]
        mean[:, 4:6] = mean[:, 4:6] @ linear.T
        mean[:, 2:4] *= scale
        mean[:, 6:8] *= scale
        self.mean[slots] = mean
        for terms in (self.var_p, self.cov_pv, self.var_v):
            block = terms[slots]
            block[:, 0:2] = block[:, 0:2] @ squares.T
            block[:, 2:4] *= scale * scale
            terms[slots] = block

    def _innovation(self, slots, boxes):
        """(box - predicted box (n, 4), its variance (n, 4)) per quantity."""
        mean = self.mean[slots]
        variance = self.var_p[slots] + (POSITION_WEIGHT * _sizes(mean)) ** 2
        return to_measurement(boxes) - mean[:, :4], variance

    def update(self, slots, boxes):
        """Correct the tracks in `slots` with their matched boxes (n, 4) x1, y1, x2, y2."""
        if slots.size == 0:
            return
        residual, variance = self._innovation(slots, boxes)
        var_p, cov_pv = self.var_p[slots], self.cov_pv[slots]
        gain_p = var_p / variance
        gain_v = cov_pv / variance
        self.mean[slots, :4] += gain_p * residual
        self.mean[slots, 4:] += gain_v * residual
        self.var_p[slots] = var_p - gain_p * var_p
        self.cov_pv[slots] = cov_pv - gain_p * cov_pv
        self.var_v[slots] -= gain_v * cov_pv

    def distance(self, slots, boxes):
        """Squared Mahalanobis distances (n,) between the predicted boxes of the tracks in
        `slots` (n,) and boxes (n, 4) x1, y1, x2, y2, pair by pair."""
        residual, variance = self._innovation(slots, boxes)
        return (residual * residual / variance).sum(axis=1)

    def boxes(self, slots):
        """The filtered boxes (n, 4) x1, y1, x2, y2 of the tracks in `slots`."""
        return to_box(self.mean[slots, :4])


def _sizes(state):
    """(n, 4) w, h, w, h of states (n, >=4) cx, cy, w, h: the noise scale of each quantity."""
    return state[:, [2, 3, 2, 3]]


def to_measurement(boxes):
    """(n, 4) x1, y1, x2, y2 -> (n, 4) centre x, centre y, width, height."""
    out = np.empty((boxes.shape[0], 4), np.float64)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) * 0.5
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) * 0.5
    out[:, 2] = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3)
    out[:, 3] = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3)
    return out


def to_box(state):
    """(n, >=4) centre x, centre y, width, height -> (n, 4) x1, y1, x2, y2."""
    out = np.empty((state.shape[0], 4), np.float64)
    half_w = np.maximum(state[:, 2], 1e-3) * 0.5
    half_h = np.maximum(state[:, 3], 1e-3) * 0.5
    out[:, 0] = state[:, 0] - half_w
    out[:, 1] = state[:, 1] - half_h
    out[:, 2] = state[:, 0] + half_w
    out[:, 3] = state[:, 1] + half_h
    return out
