"""What a user sees when `edge` cannot do its job: an exit code and one line saying why."""

import os

import pytest

from conftest import COCO8_VAL, free_port, run_edge
from edge import __version__


def assert_user_error(result, code):
    """Exit code, exactly one `edge: error:` line on stderr, no traceback; returns the line."""
    rc, _, err = result
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


@pytest.fixture
def edge_run(model_dir):
    """`edge run` on the coco8 val images (unless args name a --source: --source repeats
    for several cameras) with the session's models; extra args appended."""
    def run(*args):
        source = [] if "--source" in args else ["--source", COCO8_VAL]
        return run_edge("run", "--model-dir", model_dir, "--backend", "ort",
                        *(source + list(args)))
    return run


def write_config(tmp_path, text, name="edge.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- cards -----------------------------------------------------------------------------------

def test_unknown_card(edge_run):
    line = assert_user_error(edge_run("--detector", "nosuch"), 78)
    assert "'nosuch'" in line and "coarse-loftr" in line and "yolox-nano" in line


def test_card_path_that_does_not_exist(edge_run, tmp_path):
    path = str(tmp_path / "cards" / "mine.yaml")
    line = assert_user_error(edge_run("--detector", path), 78)
    assert path in line and "not found" in line


def test_card_used_for_the_wrong_task(edge_run):
    line = assert_user_error(edge_run("--detector", "coarse-loftr"), 78)
    assert "coarse-loftr" in line and "--matcher" in line


# --- sources ---------------------------------------------------------------------------------

def test_missing_source_folder(edge_run, tmp_path):
    path = str(tmp_path / "no-such-folder")
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--source", path), 66)
    assert path in line


def test_empty_source_folder(edge_run, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--source", str(folder)), 66)
    assert str(folder) in line and "images" in line


def test_unknown_source_scheme(edge_run):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--source", "foo://x"), 78)
    assert "foo://x" in line and "test://" in line


# --- MQTT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, reason", [
    ("http://x", "unknown scheme 'http'"),
    ("mqtt://host:notaport", "mqtt://host:notaport"),
    ("mqtt://127.0.0.1:1883?qos=2", "qos must be 0 or 1"),
    ("mqtt://127.0.0.1:1883?keepalive=1", "keepalive"),
    ("mqtt://127.0.0.1:1883?retain=1", "unknown parameter 'retain'"),
    ("mqtt://:1883", "no host"),
])
def test_bad_broker_url(edge_run, url, reason):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--mqtt", url), 78)
    assert reason in line and "mqtt://[user[:password]@]host[:port]" in line


def test_broker_password_is_not_shown(edge_run):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--mqtt",
                                      "mqtt://me:s3cret@127.0.0.1:1883?qos=5"), 78)
    assert "s3cret" not in line and "me:***@" in line


@pytest.mark.parametrize("url", ["mqtt://me:s3cret@[::1", "mqtt://me:s3cret@[::1]:99999",
                                 "mqtt://me:s3cret@127.0.0.1:1883/x"])
def test_broker_password_is_not_shown_even_when_the_url_does_not_parse(edge_run, url):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--mqtt", url), 78)
    assert "s3cret" not in line and "me:***@" in line, line


@pytest.mark.parametrize("url", ["mqtt://me:s3/cr3t@127.0.0.1:notaport",
                                 "mqtt://me:s3?cr3t#x@127.0.0.1:1883?qos=5",
                                 "mqtt://me:s3[cr3t@[::1", "mqtt://me:s3 cr3t@host:1883/x"])
@pytest.mark.parametrize("command", ["run", "health", "listen"])
def test_a_password_with_reserved_characters_is_not_shown(edge_run, url, command):
    """urllib ends the authority at the first / ? or #: its errors quoted pieces of such a
    password ("Port could not be cast to integer value as 's3'")."""
    result = edge_run("--detector", "yolox-nano", "--mqtt", url) if command == "run" else \
        run_edge(command, "ghost", "--mqtt", url)
    line = assert_user_error(result, 78)
    assert "s3" not in line and "cr3t" not in line and "me:***@" in line, line
    assert "EDGE_MQTT_PASSWORD" in line, "the fix: keep the password out of the URL"


def test_broker_not_reachable(edge_run, tmp_path):
    url = "mqtt://127.0.0.1:{}".format(free_port())      # nothing listens there
    config = write_config(tmp_path, "mqtt: {flush_timeout: 2}\n")
    line = assert_user_error(edge_run("-c", config, "--detector", "yolox-nano", "--mqtt", url),
                             69)
    assert url in line and "not delivered" in line


# --- configuration ---------------------------------------------------------------------------

def test_invalid_config_value(edge_run, tmp_path):
    config = write_config(tmp_path, "detector: yolox-nano\nmqtt:\n  qos: 2\n")
    line = assert_user_error(edge_run("-c", config), 78)
    assert config in line and "mqtt.qos" in line and "one of 0, 1" in line


def test_missing_config_file(edge_run, tmp_path):
    path = str(tmp_path / "nope.yaml")
    line = assert_user_error(edge_run("-c", path, "--detector", "yolox-nano"), 78)
    assert path in line and "not found" in line


def test_invalid_device_id_flag(edge_run):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--device-id", "a/b"), 78)
    assert "device_id" in line


@pytest.mark.parametrize("key, text", [("device_id", 'device_id: "cam1\\n"\n'),
                                       ("mqtt.prefix", 'mqtt: {prefix: "edge\\n"}\n')])
def test_a_trailing_newline_in_a_topic_name_is_refused(edge_run, tmp_path, key, text):
    """`$` matches before a final newline; a topic level with one never connects."""
    config = write_config(tmp_path, "detector: yolox-nano\n" + text)
    line = assert_user_error(edge_run("-c", config), 78)
    assert key in line


def test_max_frames_zero(edge_run):
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--max-frames", "0"), 78)
    assert "max_frames" in line


def test_no_task_configured(edge_run):
    line = assert_user_error(edge_run(), 78)
    assert "no task configured" in line and "--detector" in line


# --- outputs ---------------------------------------------------------------------------------

def test_unwritable_jsonl_path(edge_run):
    path = "/nonexistent/dir/out.jsonl"
    line = assert_user_error(edge_run("--detector", "yolox-nano", "--jsonl", path), 74)
    assert path in line


def test_unwritable_model_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the model folder should be")
    folder = str(blocker / "models")
    line = assert_user_error(run_edge("models", "fetch", "yolox-nano", "--mirror",
                                      "/nonexistent-mirror", "--model-dir", folder), 74)
    assert folder in line


# --- --debug and --version -------------------------------------------------------------------

def test_debug_shows_the_traceback_and_keeps_the_exit_code(model_dir):
    rc, _, err = run_edge("--debug", "run", "--model-dir", model_dir, "--source", COCO8_VAL,
                          "--detector", "nosuch")
    assert rc == 78, err
    assert "Traceback" in err and "ConfigError" in err
    lines = [line for line in err.splitlines() if line.startswith("edge: error:")]
    assert len(lines) == 1 and "'nosuch'" in lines[0]


@pytest.mark.parametrize("where, code, error", [("run", 78, "ConfigError"),
                                               ("models", 78, "ConfigError"),
                                               ("track", 66, "SourceError"),
                                               ("depth", 78, "ConfigError")])
def test_debug_after_the_subcommand_works_as_the_errors_say(model_dir, tmp_path, where, code,
                                                            error):
    missing = str(tmp_path / "missing")
    args = {"run": ["run", "--model-dir", model_dir, "--source", COCO8_VAL, "--detector",
                    "nosuch"],
            "models": ["models", "fetch", "nosuch"],
            "track": ["track", missing + ".txt", "--out", str(tmp_path / "results.txt")],
            "depth": ["depth", missing + ".png", missing + "-right.png", "--out",
                      str(tmp_path / "depth.npy")]}[where]
    rc, _, err = run_edge(*(args + ["--debug"]))
    assert rc == code, err
    assert "Traceback" in err and error in err and "unrecognized" not in err


def subcommands(parser, path=()):
    """(names, parser) of every subcommand, at every level (`models fetch`)."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from subcommands(sub, path + (name,))


def required_args(parser):
    """The least a subcommand's parser takes: a value for each required positional and
    option (its first choice where it has choices)."""
    import argparse
    args = []
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        value = [str(action.choices[0]) if action.choices else "1"]
        if not action.option_strings:
            args += [] if action.nargs in ("?", "*") else value * (
                action.nargs if isinstance(action.nargs, int) else 1)
        elif action.required:
            args += [action.option_strings[0]] + value
    return args


def test_every_subcommand_takes_debug_before_and_after_its_name():
    """`--debug` was refused after `edge track` and `edge depth` (unrecognized arguments):
    every subcommand takes it, at every level, and the top-level flag still works."""
    from edge.cli import parser
    found = list(subcommands(parser()))
    assert {names[0] for names, _ in found} >= {"run", "track", "depth", "models"}
    for names, sub in found:
        args = list(names) + required_args(sub)
        for argv in (args + ["--debug"], ["--debug"] + args):
            assert parser().parse_args(argv).debug is True, argv
        assert parser().parse_args(args).debug is False, args


def closed_stdout(*args):
    """`edge ARGS` writing into a pipe whose reader has gone (`edge ... | head`)."""
    import subprocess
    import sys
    from conftest import ROOT
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "edge"] + list(args), stdout=write_end,
                            stderr=subprocess.PIPE, cwd=ROOT)
    os.close(write_end)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def test_a_closed_stdout_ends_quietly_with_the_commands_own_status(broker):
    rc, err = closed_stdout("models", "list")
    assert rc == 0 and err == "", err
    rc, err = closed_stdout("health", "ghost", "--json", "--mqtt", broker.url, "--timeout", "1")
    assert rc == 2 and "Error" not in err and "error" not in err, err


def test_version():
    rc, out, err = run_edge("--version")
    assert rc == 0, err
    assert out.strip() == "edge " + __version__


def test_no_command_prints_help():
    rc, out, _ = run_edge()
    assert rc == 0
    assert "run" in out and "models" in out


def test_unknown_flag_is_a_usage_error():
    rc, _, err = run_edge("run", "--detectr", "yolox-nano")
    assert rc == 2
    assert "unrecognized arguments" in err and "Traceback" not in err


def test_the_success_path_for_contrast(edge_run, tmp_path):
    out = tmp_path / "out.jsonl"
    rc, _, err = edge_run("--detector", "yolox-nano", "--jsonl", str(out))
    assert rc == 0, err
    assert not [line for line in err.splitlines() if line.startswith("edge:")]
    assert len(out.read_text().splitlines()) == len(os.listdir(COCO8_VAL))
