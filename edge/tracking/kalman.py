"""A constant-velocity Kalman filter for boxes, run on all tracks at once.

State per track (8,): centre x, centre y, width, height and their velocities in pixels per
frame; the measurement is the box's centre and size (4,). The noise scales with the box
(BoT-SORT's width/height form of ByteTrack's filter): a large box near the camera moves
more pixels per frame than a small one far away. Means and covariances live in arrays of a
fixed capacity, indexed by track slot, so predicting and updating allocate only numpy's
temporaries, never anything that grows with the run.
"""

import numpy as np

POSITION_WEIGHT = 1.0 / 20.0    # std of position noise, as a share of the box size
VELOCITY_WEIGHT = 1.0 / 160.0   # std of velocity noise per frame, as a share of the box size
# A new track's velocity is unknown: its std is half the box's size per frame, so that the
# gate lets a fast object (a robot turning) be followed from its second frame on.
START_VELOCITY = 0.5


class BoxKalman:
    """Means (capacity, 8) and covariances (capacity, 8, 8) of the tracks in their slots."""

    def __init__(self, capacity):
        self.mean = np.zeros((capacity, 8), np.float64)
        self.cov = np.zeros((capacity, 8, 8), np.float64)

    def start(self, slots, boxes):
        """New tracks in `slots` from boxes (n, 4) x1, y1, x2, y2."""
        z = to_measurement(boxes)
        self.mean[slots, :4] = z
        self.mean[slots, 4:] = 0.0
        size = np.repeat(z[:, 2:4], 2, axis=1)[:, [0, 2, 1, 3]]     # w, h, w, h
        std = np.concatenate([2.0 * POSITION_WEIGHT * size, START_VELOCITY * size], 1)
        self.cov[slots] = 0.0
        diag = np.arange(8)
        self.cov[slots[:, None], diag, diag] = std * std

    def predict(self, slots, steps):
        """Move the tracks in `slots` `steps` frames ahead (steps >= 1: frames a live source
        dropped count as time passing)."""
        if slots.size == 0:
            return
        mean = self.mean[slots]
        size = np.repeat(mean[:, 2:4], 2, axis=1)[:, [0, 2, 1, 3]]
        q = np.concatenate([POSITION_WEIGHT * size, VELOCITY_WEIGHT * size], 1) ** 2 * steps
        mean[:, :4] += steps * mean[:, 4:]
        self.mean[slots] = mean
        cov = self.cov[slots]
        # F P F^T with F = [[I, dt I], [0, I]], by blocks (cheaper than two 8x8 products)
        p11, p12, p21, p22 = cov[:, :4, :4], cov[:, :4, 4:], cov[:, 4:, :4], cov[:, 4:, 4:]
        top_left = p11 + steps * (p12 + p21) + steps * steps * p22
        top_right = p12 + steps * p22
        bottom_left = p21 + steps * p22
        cov[:, :4, :4] = top_left
        cov[:, :4, 4:] = top_right
        cov[:, 4:, :4] = bottom_left
        diag = np.arange(8)
        cov[:, diag, diag] += q
        self.cov[slots] = cov

    def update(self, slots, boxes):
        """Correct the tracks in `slots` with their matched boxes (n, 4) x1, y1, x2, y2."""
        if slots.size == 0:
            return
        z = to_measurement(boxes)
        mean = self.mean[slots]
        cov = self.cov[slots]
        size = np.repeat(mean[:, 2:4], 2, axis=1)[:, [0, 2, 1, 3]]
        r = (POSITION_WEIGHT * size) ** 2
        s = cov[:, :4, :4].copy()
        diag = np.arange(4)
        s[:, diag, diag] += r
        # K = P H^T S^-1; with S symmetric, K^T = S^-1 (H P)
        gain = np.linalg.solve(s, cov[:, :4, :]).transpose(0, 2, 1)        # (n, 8, 4)
        innovation = z - mean[:, :4]
        self.mean[slots] = mean + np.matmul(gain, innovation[:, :, None])[:, :, 0]
        self.cov[slots] = cov - np.matmul(gain, cov[:, :4, :])

    def distance(self, slots, boxes):
        """Squared Mahalanobis distances (n,) between the predicted measurements of the
        tracks in `slots` (n,) and boxes (n, 4) x1, y1, x2, y2, pair by pair."""
        mean = self.mean[slots]
        size = np.repeat(mean[:, 2:4], 2, axis=1)[:, [0, 2, 1, 3]]
        s = self.cov[slots, :4, :4]            # fancy indexing: a copy
        diag = np.arange(4)
        s[:, diag, diag] += (POSITION_WEIGHT * size) ** 2
        d = (to_measurement(boxes) - mean[:, :4])[:, :, None]               # (n, 4, 1)
        return (d * np.linalg.solve(s, d)).sum(axis=(1, 2))

    def boxes(self, slots):
        """The filtered boxes (n, 4) x1, y1, x2, y2 of the tracks in `slots`."""
        return to_box(self.mean[slots, :4])


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
