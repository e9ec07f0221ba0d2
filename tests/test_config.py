"""The config file and model cards: defaults, overrides, and errors that name file, key and fix."""

import json
import os
import re

import pytest
import yaml

from conftest import COCO8_VAL, ROOT, run_edge
from edge import cards, config
from edge.errors import EXIT_CONFIG, ConfigError

YOLOX_CARD = os.path.join(ROOT, "engines", "yolox-nano.yaml")
LOFTR_CARD = os.path.join(ROOT, "engines", "coarse-loftr.yaml")


def write(path, text):
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def config_error(path=None, overrides=None):
    """The ConfigError config.load raises, checked to map to exit code 78."""
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    assert info.value.exit_code == EXIT_CONFIG == 78
    return str(info.value)


# --- defaults and the file -------------------------------------------------------------------

def test_defaults_need_a_task():
    message = config_error(None, {})
    assert "detector" in message and "--detector" in message


def test_defaults_with_a_detector(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_MODEL_DIR", str(tmp_path / "models"))
    cfg = config.load(None, {"detector": "yolox-nano"})
    assert cfg["detector"] == "yolox-nano"
    assert cfg["matcher"] is None
    assert cfg["source"] == "test://"
    assert cfg["backend"] == "auto"
    assert cfg["model_dir"] == str(tmp_path / "models")
    assert cfg["model_mirror"] is None and cfg["jsonl"] is None and cfg["max_frames"] is None
    assert cfg["log_level"] == "info"
    assert cfg["mqtt"] == {"url": None, "prefix": "edge", "qos": 0, "keepalive": 30,
                           "queue": 1000, "flush_timeout": 10.0, "protocol": "3.1.1", "username": None,
                           "password_file": None, "ca_file": None, "cert_file": None,
                           "key_file": None}
    assert cfg["pipeline"] == {"pool": 6, "threads": 0, "batch": "auto"}
    assert cfg["sources"] is None          # one unnamed camera: `source`
    # the device id defaults to the host name, made safe for MQTT topics
    assert re.match(r"^[A-Za-z0-9_.-]+$", cfg["device_id"])


def test_model_dir_default_without_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGE_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = config.load(None, {"matcher": "coarse-loftr"})
    assert cfg["model_dir"] == os.path.join(str(tmp_path), "edge", "models")


EVERY_SECTION = """\
device_id: cam-1.front_door
source: images:///data/shots
detector: yolox-nano
matcher: coarse-loftr
backend: ort
model_dir: ~/models
model_mirror: /srv/mirror
max_frames: 25
jsonl: /var/log/edge.jsonl
log_level: warning
mqtt:
  url: mqtt://broker.local:1884
  prefix: site/a
  qos: 1
  keepalive: 60
  queue: 50
  flush_timeout: 2.5
  username: cam-1
  password_file: /etc/edge/mqtt-password
  ca_file: /etc/edge/ca.crt
  cert_file: /etc/edge/cam-1.crt
  key_file: /etc/edge/cam-1.key
pipeline:
  pool: 8
  threads: 2
  batch: never
"""


def test_a_file_with_every_section(tmp_path):
    cfg = config.load(write(tmp_path / "edge.yaml", EVERY_SECTION))
    assert cfg["device_id"] == "cam-1.front_door"
    assert cfg["source"] == "images:///data/shots"
    assert cfg["detector"] == "yolox-nano" and cfg["matcher"] == "coarse-loftr"
    assert cfg["backend"] == "ort"
    assert cfg["model_dir"] == os.path.expanduser("~/models")   # ~ is expanded
    assert cfg["model_mirror"] == "/srv/mirror"
    assert cfg["max_frames"] == 25
    assert cfg["jsonl"] == "/var/log/edge.jsonl"
    assert cfg["log_level"] == "warning"
    assert cfg["mqtt"] == {"url": "mqtt://broker.local:1884", "prefix": "site/a", "qos": 1,
                           "keepalive": 60, "queue": 50, "flush_timeout": 2.5, "protocol": "3.1.1",
                           "username": "cam-1", "password_file": "/etc/edge/mqtt-password",
                           "ca_file": "/etc/edge/ca.crt", "cert_file": "/etc/edge/cam-1.crt",
                           "key_file": "/etc/edge/cam-1.key"}
    assert cfg["pipeline"] == {"pool": 8, "threads": 2, "batch": "never"}


def test_an_empty_file_is_the_defaults(tmp_path):
    cfg = config.load(write(tmp_path / "edge.yaml", "# nothing yet\n"), {"detector": "x"})
    assert cfg["mqtt"]["qos"] == 0 and cfg["pipeline"]["pool"] == 6


def test_flag_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path / "edge.yaml", EVERY_SECTION)
    cfg = config.load(path, {"source": "test://", "detector": "other-card", "mqtt.url":
                             "mqtt://127.0.0.1:1999", "device_id": "flagged", "backend": "auto",
                             "max_frames": 3, "jsonl": None, "matcher": None})
    assert cfg["source"] == "test://"
    assert cfg["detector"] == "other-card"
    assert cfg["mqtt"]["url"] == "mqtt://127.0.0.1:1999"
    assert cfg["device_id"] == "flagged"
    assert cfg["backend"] == "auto"
    assert cfg["max_frames"] == 3
    # a flag that was not given (None) leaves the file's value alone
    assert cfg["jsonl"] == "/var/log/edge.jsonl"
    assert cfg["matcher"] == "coarse-loftr"
    # keys the flags do not touch keep the file's values
    assert cfg["mqtt"]["qos"] == 1 and cfg["mqtt"]["prefix"] == "site/a"


def test_an_override_is_validated_like_the_file(tmp_path):
    message = config_error(None, {"detector": "yolox-nano", "device_id": "cam/1"})
    assert "device_id" in message


def test_flags_win_over_the_file_in_a_real_run(tmp_path, model_dir):
    """`edge run -c FILE --flags`: the file's source, detector and jsonl would all fail."""
    out = tmp_path / "out.jsonl"
    path = write(tmp_path / "edge.yaml", "source: {}\ndetector: nosuch\njsonl: {}\n"
                 "device_id: from-file\n".format(tmp_path / "no-such-folder",
                                                 tmp_path / "no" / "such" / "x.jsonl"))
    rc, _, err = run_edge("run", "-c", path, "--source", COCO8_VAL, "--detector", "yolox-nano",
                          "--jsonl", str(out), "--model-dir", model_dir, "--backend", "ort")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    assert {m["device"] for m in lines} == {"from-file"}   # not overridden: the file's value


# --- config errors: file, key path, allowed values -------------------------------------------

@pytest.mark.parametrize("text, key, expect", [
    ("detektor: yolox-nano\n", "detektor", ["unknown key", "detector", "matcher", "mqtt"]),
    ("mqtt:\n  qoss: 1\n", "mqtt.qoss", ["unknown key", "qos", "keepalive"]),
    ("mqtt:\n  qos: one\n", "mqtt.qos", ["one of 0, 1", "'one'"]),
    ("mqtt:\n  qos: 2\n", "mqtt.qos", ["one of 0, 1", "got 2"]),
    ("backend: cuda\n", "backend", ["one of auto, ort, trt", "'cuda'"]),
    ("mqtt:\n  keepalive: 1\n", "mqtt.keepalive", ["from 5 to 3600", "got 1"]),
    ("pipeline:\n  pool: yes\n", "pipeline.pool", ["an integer", "from 3 to 64", "True"]),
    ("max_frames: 0\n", "max_frames", [">= 1"]),
    ("device_id: cam/1\n", "device_id", ["no / + #", "'cam/1'"]),
    ("mqtt:\n  prefix: 'edge/+'\n", "mqtt.prefix", ["without + #"]),
    ("mqtt:\n  flush_timeout: fast\n", "mqtt.flush_timeout", ["a number"]),
    ("log_level: loud\n", "log_level", ["one of debug, info, warning, error"]),
    ("mqtt: 5\n", "mqtt", ["mapping"]),
])
def test_config_errors_name_file_key_and_allowed_values(tmp_path, text, key, expect):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\n" + text)
    message = config_error(path)
    assert path in message
    assert "{}:".format(key) in message
    for part in expect:
        assert part in message, message
    assert "\n" not in message      # one line


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\nmqtt:\n  qos: 1\n"
                 "  keepalive: [30\nsource: test://\n")
    message = config_error(path)
    assert path in message and "not valid YAML" in message
    line = int(re.search(r"line (\d+)", message).group(1))
    assert 4 <= line <= 5, message


def test_invalid_yaml_indentation_names_the_line(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\nmqtt:\n  qos: 1\n"
                 " keepalive: 30\n")
    message = config_error(path)
    assert path in message and "line 4" in message


def test_a_top_level_list_is_refused(tmp_path):
    path = write(tmp_path / "edge.yaml", "- detector: yolox-nano\n- source: test://\n")
    message = config_error(path)
    assert path in message and "mapping" in message


def test_a_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = config_error(path, {"detector": "yolox-nano"})
    assert path in message and "not found" in message


BILLION_LAUGHS = "".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"] +
    ["a{}: &a{} [{}]\n".format(i, i, ", ".join(["*a{}".format(i - 1)] * 9)) for i in range(1, 9)])


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases are 9^9 values once expanded: refused while loading, in a
    process whose memory is capped (it used to hang and grow to gigabytes)."""
    import resource
    import subprocess
    import sys
    path = write(tmp_path / "edge.yaml", BILLION_LAUGHS.replace("a8: &a8", "source: &a8"))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    proc = subprocess.run([sys.executable, "-m", "edge", "run", "-c", path, "--detector",
                           "yolox-nano"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, cwd=ROOT, preexec_fn=cap)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_CONFIG, err
    assert path in err and "aliases expand to more than" in err and len(err) < 500, err


def test_aliases_that_refer_to_themselves_are_refused(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\nsource: &s [*s]\n")
    message = config_error(path)
    assert path in message and "alias refers to the value that holds it" in message


def test_a_few_aliases_are_fine(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\ndevice_id: &id cam1\n"
                 "mqtt: {prefix: *id}\n")
    cfg = config.load(path)
    assert cfg["device_id"] == "cam1" and cfg["mqtt"]["prefix"] == "cam1"


@pytest.mark.parametrize("text", ["source: [{}]\n".format(", ".join(map(str, range(100000)))),
                                  "device_id: {}\n".format("x" * 100000),
                                  "mqtt: [{}]\n".format(", ".join(["[[[[[1]]]]]"] * 1000))])
def test_an_error_shows_a_short_piece_of_a_huge_value(tmp_path, text):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\n" + text)
    message = config_error(path)
    assert path in message and len(message) < len(path) + 300, message


def test_a_flag_into_an_empty_section_of_the_file(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\nmqtt:\n  # url: mqtt://x\n")
    cfg = config.load(path, {"mqtt.url": "mqtt://127.0.0.1:1883"})
    assert cfg["mqtt"]["url"] == "mqtt://127.0.0.1:1883"


def test_a_flag_into_a_scalar_section_is_a_config_error(tmp_path):
    path = write(tmp_path / "edge.yaml", "detector: yolox-nano\nmqtt: 5\n")
    message = config_error(path, {"mqtt.url": "mqtt://127.0.0.1:1883"})
    assert path in message and "mqtt" in message


# --- model cards -----------------------------------------------------------------------------

def card_file(tmp_path, edit=None, base=YOLOX_CARD, name="card.yaml"):
    """A copy of a shipped card in tmp_path, changed by `edit(data)`."""
    with open(base, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if edit is not None:
        edit(data)
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f)
    return path


def card_error(path):
    with pytest.raises(ConfigError) as info:
        cards.load(path)
    assert info.value.exit_code == 78
    message = str(info.value)
    assert path in message, message
    return message


def test_shipped_cards_load():
    yolox = cards.load("yolox-nano")
    assert yolox.task == "detect" and yolox.family == "yolox"
    assert yolox.input_size == (416, 416)
    assert yolox.thresholds == {"score": 0.3, "iou": 0.45}
    assert yolox.label(0) == "person" and len(yolox.labels) == 80
    loftr = cards.load("coarse-loftr")
    assert loftr.task == "match" and loftr.input["color"] == "gray"
    assert set(cards.available()) >= {"yolox-nano", "coarse-loftr"}


def test_a_copied_card_loads_from_its_path(tmp_path):
    card = cards.load(card_file(tmp_path))
    assert card.name == "yolox-nano" and card.path == str(tmp_path / "card.yaml")
    assert card.label(0) == "person"       # labels found on the search path
    assert card.label(1000) == "1000"


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, key, expect", [
    (_set("family", "yolov99"), "family", ["one of", "yolox", "yolov8", "'yolov99'"]),
    (_set("task", "classify"), "task", ["one of detect, match"]),
    (_set("input", "size", [416, 416, 3]), "input.size", ["a list of 2 numbers"]),
    (_set("input", "size", [416, 0]), "input.size", ["> 0"]),
    (_set("input", "color", "hsv"), "input.color", ["one of bgr, rgb, gray", "'hsv'"]),
    (_set("input", "resize", "crop"), "input.resize", ["one of letterbox, stretch"]),
    (_set("input", "pad", "position", "middle"), "input.pad.position", ["top-left, center"]),
    (_set("model", "sha256", "abc123"), "model.sha256", ["64 lowercase hex digits"]),
    (_set("model", "sha256", "695E750A5D5754BB5A8D5325643B59282191A7E7A564E435A415FD3C578EAB14"),
     "model.sha256", ["64 lowercase hex digits"]),
    (_set("model", "file", "../x.onnx"), "model.file", ["plain file name", "no folders"]),
    (_set("model", "file", "/etc/passwd"), "model.file", ["plain file name"]),
    (_set("model", "url", "ftp://example.com/x.onnx"), "model.url", ["http(s) URL"]),
    (_set("thresholds", "score", 1.5), "thresholds.score", ["from 0.0 to 1.0", "1.5"]),
    (_set("thresholds", "nms", 0.5), "thresholds.nms", ["unknown key", "iou", "score"]),
    (_set("precision", "int4"), "precision", ["one of fp16, fp32"]),
    (_set("colour", "bgr"), "colour", ["unknown key"]),
])
def test_card_errors_name_file_and_key(tmp_path, edit, key, expect):
    message = card_error(card_file(tmp_path, edit))
    assert "{}:".format(key) in message, message
    for part in expect:
        assert part in message, message


def test_a_card_without_its_model_section(tmp_path):
    message = card_error(card_file(tmp_path, lambda d: d.pop("model")))
    assert "model.file: missing" in message


def test_task_family_mismatch(tmp_path):
    def edit(data):
        data["task"] = "match"
        data.pop("thresholds")
    message = card_error(card_file(tmp_path, edit))
    assert "task:" in message and "yolox" in message and "detect" in message


def test_task_family_mismatch_is_reported_as_such(tmp_path):
    message = card_error(card_file(tmp_path, _set("task", "match")))
    assert "task:" in message and "family yolox is a detect model" in message


def test_labels_that_do_not_exist(tmp_path):
    message = card_error(card_file(tmp_path, _set("labels", "klingon80")))
    assert "labels:" in message and "klingon80" in message


def test_invalid_yaml_in_a_card_names_the_line(tmp_path):
    path = write(tmp_path / "card.yaml", "name: x\ntask: detect\ninput: {size: [1, 2}\n")
    message = card_error(path)
    assert "line 3" in message and "not valid YAML" in message


def test_unknown_card_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        cards.load("nosuch")
    message = str(info.value)
    assert info.value.exit_code == 78
    assert "'nosuch'" in message and "coarse-loftr" in message and "yolox-nano" in message


def test_a_card_path_that_does_not_exist(tmp_path):
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="file not found") as info:
        cards.load(path)
    assert path in str(info.value)


def test_a_card_named_on_the_edge_cards_path(tmp_path, monkeypatch):
    folder = tmp_path / "cards"
    folder.mkdir()
    card_file(folder, _set("name", "my-detector"), name="my-detector.yaml")
    monkeypatch.setenv("EDGE_CARDS", str(folder))
    assert cards.load("my-detector").name == "my-detector"
    with pytest.raises(ConfigError) as info:
        cards.load("nosuch")
    assert "my-detector" in str(info.value)


@pytest.mark.parametrize("edit, base, key, expect", [
    (_set("input", "size", [320, 320]), YOLOX_CARD, "input.size",
     ["[320, 320]", "yolox_nano.onnx takes 416x416", "set input.size to [416, 416]"]),
    (_set("input", "color", "gray"), YOLOX_CARD, "input.color",
     ["gray gives 1 channel", "takes 3", "use bgr or rgb"]),
    (_set("input", "size", [320, 240]), LOFTR_CARD, "input.size",
     ["coarse_loftr_teacher.onnx takes 640x480", "set input.size to [640, 480]"]),
])
def test_a_card_that_disagrees_with_its_model_is_one_config_error(tmp_path, model_dir, edit,
                                                                  base, key, expect):
    """The model's fixed input shape is checked when it loads, not at the first frame."""
    path = card_file(tmp_path, edit, base=base)
    flag = "--detector" if base == YOLOX_CARD else "--matcher"
    rc, _, err = run_edge("run", flag, path, "--source", COCO8_VAL, "--model-dir", model_dir,
                          "--state-dir", str(tmp_path / "state"), "--jsonl",
                          str(tmp_path / "o.jsonl"))
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert rc == EXIT_CONFIG and len(lines) == 1 and "Traceback" not in err, err
    assert "card {}: {}:".format(path, key) in lines[0], lines[0]
    for part in expect:
        assert part in lines[0], lines[0]


def _leaves(spec, prefix=""):
    for key, field in spec.items():
        if isinstance(field, dict):
            yield from _leaves(field, prefix + key + ".")
        else:
            yield prefix + key, field


def _nested(dotted, value):
    *sections, key = dotted.split(".")
    text = "{}: {}\n".format(key, value)
    for section in reversed(sections):
        text = "{}:\n".format(section) + "".join("  " + line + "\n"
                                                  for line in text.splitlines())
    return text


@pytest.mark.parametrize("dotted, field", list(_leaves(config.SPEC)),
                         ids=[k for k, _ in _leaves(config.SPEC)])
def test_every_config_key_refuses_a_wrong_value_naming_key_and_allowed_values(tmp_path, dotted,
                                                                            field):
    """A value of the wrong type for every key, and one past each bound."""
    bad = ["[1, 2]"]
    if field.min is not None:
        bad.append(str(field.min - 1))
    if field.max is not None:
        bad.append(str(field.max + 1))
    task = None if dotted == "detector" else {"detector": "yolox-nano"}
    for value in bad:
        path = write(tmp_path / "edge.yaml", _nested(dotted, value))
        message = config_error(path, task)
        assert "{}: {}:".format(path, dotted) in message, message
        assert field.describe() in message, message
        assert "\n" not in message


def test_a_zero_byte_card_is_refused_naming_what_is_missing(tmp_path):
    path = str(tmp_path / "empty.yaml")
    open(path, "w").close()
    message = card_error(path)
    assert "name: missing" in message and "\n" not in message
