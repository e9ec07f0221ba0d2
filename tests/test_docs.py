"""The docs stay true: the configuration reference (docs/configuration.md) holds every key
the config accepts, with the same defaults; the CLI they document exists; every program they
tell users to run can be had; the README stays a landing page; no relative link is broken.
"Docs" are README.md and every docs/*.md."""

import glob
import os
import re

import yaml

from edge import config
from edge.cli import parser
from edge.validate import Field
from tests.conftest import ROOT


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def readme():
    return read("README.md")


def doc_paths():
    """README.md and every docs/*.md, relative to the repository."""
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in
                                  glob.glob(os.path.join(ROOT, "docs", "*.md")))


def docs():
    """(path, text) of README.md and every docs/*.md."""
    return [(path, read(path)) for path in doc_paths()]


def spec_paths(spec, prefix=""):
    for key, field in spec.items():
        if isinstance(field, dict):
            yield from spec_paths(field, prefix + key + ".")
        else:
            yield prefix + key, field


def test_configuration_reference_lists_every_key_with_its_default():
    section = read("docs/configuration.md").split("# Configuration reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    documented = yaml.safe_load(block)
    for path, field in spec_paths(config.SPEC):
        node = documented
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, \
                "docs/configuration.md lacks config key " + path
            node = node[part]
        assert isinstance(field, Field)
        assert node == field.default, \
            "docs/configuration.md: default of {} is {!r}, code says {!r}".format(
                path, node, field.default)


def test_every_subcommand_in_the_docs_exists():
    commands = set(parser()._subparsers._group_actions[0].choices)
    for path, text in docs():
        for name in re.findall(r"`edge (\w+)", text):
            assert name in commands, "{} documents `edge {}`".format(path, name)
    everything = "\n".join(text for _, text in docs())
    for name in commands:
        assert "edge {}".format(name) in everything, "the docs do not document edge " + name


# Programs the docs may tell users to run beside `edge` and the repository's own files
# (tools/..., .venv/bin/...): those of every Ubuntu and JetPack system.
BASE_SYSTEM = {"sudo", "sh", "bash", "apt", "apt-get", "systemctl", "journalctl",
               "systemd-analyze", "nano", "python", "python3", "pip", "pip3", "git", "sed",
               "cp", "install", "ls", "echo", "fallocate", "mkswap", "source", "set"}
# Programs that need installing, with what the page that runs them must say about where
# they come from.
INSTALL = {
    # (a code span may wrap: \s takes the line break)
    "mosquitto_pub": r"apt-get\s+install\s[^`]*mosquitto-clients",
    "mosquitto_sub": r"apt-get\s+install\s[^`]*mosquitto-clients",
    "polygraphy": r"pip\s+install\s[^`]*polygraphy",
    "trtexec": r"/usr/src/tensorrt/bin/trtexec",
    "mosquitto_passwd": r"apt-get\s+install\s[^`]*mosquitto\b",
    "ros2": r"source\s+/opt/ros/\w+/setup\.bash",
    "mkdocs": r"pip\s+install\s[^`]*-r\s+docs/requirements\.txt",
}


def commands_in(text):
    """(program, command) of each command the text tells users to run: every line of its
    ```sh blocks, and each inline `code` span that starts with a program name and either
    passes a flag or names a program known to be one (`systemctl status edge`)."""
    known = BASE_SYSTEM | set(INSTALL) | {"edge"}
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"(^|\s)#.*", "", line).strip()
            if command:
                yield program(command), command
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        words = span.split()
        if not words or not re.match(r"^[\w.][\w./-]*$", words[0]):
            continue
        name = program(span)
        if name in known or any(re.match(r"^--?[A-Za-z]", w) for w in words[1:]):
            yield name, span


def program(command):
    """The program a shell command runs: past `sudo` and VAR=value, a repository path kept
    as it is, `.venv/bin/X` and `.venv-docs/bin/X` as X."""
    words = command.split()
    while words and (words[0] == "sudo" or re.match(r"^\w+=", words[0])):
        if words[0] == "sudo" and words[1:2] == ["-u"]:
            words = words[2:]           # sudo -u USER: the user goes too
        words = words[1:]
    name = words[0] if words else ""
    for venv in (".venv/bin/", ".venv-docs/bin/"):
        if name.startswith(venv):
            return name[len(venv):]
    return name


def test_every_command_the_docs_run_is_edge_or_says_how_to_install_it():
    """A user who follows a page of the docs has each program it runs: `edge` and the
    repository's tools, a base system's programs, or one the same page says how to install
    (mosquitto_sub and mosquitto_pub are not in the `mosquitto` package the tools install)."""
    assert list(commands_in("Clear it with `mosquitto_pub -r -n -t T` (the `connection "
                            "lost` line, `tools/fleet N`)")) == [
        ("mosquitto_pub", "mosquitto_pub -r -n -t T")]
    for path, text in docs():
        for name, command in commands_in(text):
            if name == "edge" or name in BASE_SYSTEM:
                continue
            if "/" in name:
                assert os.path.exists(os.path.join(ROOT, name)), "{} runs {} ({})".format(
                    path, name, command)
                continue
            assert name in INSTALL, "{} tells users to run `{}`: use an edge command, or " \
                                    "say how to install {} (and add it to INSTALL " \
                                    "here)".format(path, command, name)
            assert re.search(INSTALL[name], text), "{} runs `{}` without saying how to " \
                                                   "install {} ({})".format(
                                                       path, command, name, INSTALL[name])


# The README is the landing page: short, and the two commands (`.ci/run` calls the second)
# in its first screen, word for word.
TWO_COMMANDS = [
    "tools/demo    # the main job on a fresh machine: sets up, runs, prints what a robot receives",
    "tools/test    # sets up and runs the whole test suite",
]


def test_the_readme_is_a_landing_page_with_the_two_commands_first():
    lines = readme().splitlines()
    assert len(lines) <= 400, "README.md has {} lines; the manual belongs in docs/".format(
        len(lines))
    for command in TWO_COMMANDS:
        assert command in lines[:60], "README.md's first 60 lines lack: " + command
    assert "exec tools/test" in read(".ci/run")


def links_in(text):
    """Targets of the markdown links and images of a text, outside code."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def test_every_relative_link_points_at_a_file():
    assert links_in("[a](docs/x.md#y) `[b](c)` ![p](img/d.jpg) [e](https://e.org)") == [
        "docs/x.md#y", "img/d.jpg", "https://e.org"]
    checked = 0
    for path, text in docs():
        for target in links_in(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            file = target.split("#", 1)[0]
            where = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), file))
            assert os.path.exists(where), "{} links to {}, which does not exist".format(
                path, target)
            checked += 1
    assert checked >= 20


def test_every_docs_page_is_in_the_site():
    """mkdocs.yml's nav lists every page of docs/ (mkdocs builds a page left out of it, but
    nobody finds it)."""
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        nav = yaml.safe_load(f)["nav"]

    def pages(entries):
        for entry in entries:
            for value in entry.values():
                if isinstance(value, list):
                    yield from pages(value)
                else:
                    yield value
    listed = set(pages(nav))
    for path in doc_paths()[1:]:
        assert os.path.relpath(path, "docs") in listed, "mkdocs.yml's nav lacks " + path
