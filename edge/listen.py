"""`edge listen`: what robots receive, as readable lines or JSON lines, filtered (edge.client).

Messages come checked by edge.client (strict JSON, the API document's bounds, the sender
from the topic); every string in them is still a peer's text, printed through
edge.peertext.text (escaped, bounded), and times through peertext.when. JSON lines are
json.dumps of the checked payload: escaped by JSON itself, at most the client's max_payload.
"""

import json
import sys

from edge import client as edge_client
from edge.errors import EXIT_OK, ConfigError
from edge.peertext import text as _text
from edge.peertext import when

CONNECT_TIMEOUT = 5.0       # s: for a broker that does not answer (a refusal ends it at once)


def _who(message):
    return _text(message.device) + ("/" + _text(message.camera) if message.camera else "")


def _detection_text(d):
    text = "{} {:.2f} [{}]".format(_text(d.label), d.score,
                                   " ".join("{:.0f}".format(v) for v in d.box))
    if d.track_id is not None:
        text += " track {}".format(d.track_id)
    if d.spatial is not None:
        text += " at x {:.2f} y {:.2f} z {:.2f} m".format(d.spatial.x / 1000.0,
                                                         d.spatial.y / 1000.0,
                                                         d.spatial.z / 1000.0)
    return text


def _frame_text(message):
    frame = message.frame
    return "seq {} frame {}{}".format(message.seq, frame.index,
                                      " " + _text(frame.name) if frame.name else "")


def _detections_line(message):
    return "{} detections {}: {}".format(
        _who(message), _frame_text(message),
        ", ".join(_detection_text(d) for d in message.detections) or "nothing")


def _event_line(message):
    where = " ".join(_text(v) for v in (message.zone, message.line, message.direction) if v)
    return "{} event seq {} frame {}: track {} {} {}{}".format(
        _who(message), message.seq, message.frame_index, message.track_id, _text(message.label),
        _text(message.type), " " + where if where else "")


def _depth_line(message):
    nearest = message.nearest()
    known = sum(1 for row in message.depth_mm for mm in row if mm is not None)
    return "{} depth {}: {}x{} grid, {} of {} cells known, nearest {}".format(
        _who(message), _frame_text(message), message.columns, message.rows, known,
        message.columns * message.rows, "-" if nearest is None else
        "{:.2f} m at column {} row {}".format(nearest[0] / 1000.0, nearest[1], nearest[2]))


def _matches_line(message):
    return "{} matches {}: reference {}, {} matches, {} inliers, homography {}".format(
        _who(message), _frame_text(message), _text(message.reference["name"]), message.count,
        message.inliers, "found" if message.homography else "none")


def _status_line(message):
    return "{} status {} since {}{}".format(
        _text(message.device), _text(message.state), when(message.since),
        " ({})".format(_text(message.reason)) if message.reason else "")


def _health_line(message):
    reasons = "; ".join(_text(r) for r in message.reasons[:10]) + (
        "; and {} more".format(len(message.reasons) - 10) if len(message.reasons) > 10 else "")
    return "{} health {}: {}".format(_text(message.device), _text(message.state),
                                     "healthy" if message.healthy else reasons or "unhealthy")


LINES = {"detections": _detections_line, "events": _event_line, "depth": _depth_line,
         "matches": _matches_line, "status": _status_line, "health": _health_line}


def line(message):
    """One readable line for a message of edge.client."""
    return LINES[message.kind](message)


def listen(url, devices, topics, cameras=None, labels=None, min_score=None, count=None,
           as_json=False, prefix="edge", credentials=None, out=None):
    """Print the messages until `count` (None: until interrupted); exit status."""
    out = out or sys.stdout
    topics = topics or ["detections"]
    if (labels or min_score is not None) and not set(topics) & set(edge_client.LABELLED_TOPICS):
        raise ConfigError("edge listen: --label and --min-score filter {}; --topic {} has "
                          "neither".format(" and ".join(edge_client.LABELLED_TOPICS),
                                           " ".join(topics)))
    if count is not None and count < 1:
        raise ConfigError("edge listen: --count {}: at least 1".format(count))
    client = edge_client.Client(url, devices=devices, topics=topics, cameras=cameras,
                                labels=labels, min_score=min_score, prefix=prefix,
                                **(credentials or {}))
    client.connect(CONNECT_TIMEOUT, retry=False)
    try:
        # on stderr, so that stdout holds only messages (`--json | jq`); tests wait for it
        print("edge listen: subscribed to {} on {}".format(
            " ".join(client.subscriptions), client.settings["display"]), file=sys.stderr,
            flush=True)
        for message in client.messages(count=count):
            out.write((json.dumps(message.payload, separators=(",", ":")) if as_json
                       else line(message)) + "\n")
            out.flush()     # line by line: a pipe sees each message as it comes
    finally:
        client.close()
    return EXIT_OK
