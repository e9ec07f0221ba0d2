"""The README stays true: its configuration reference holds every key the config accepts,
with the same defaults, and the CLI it documents exists."""

import os
import re

import yaml

from edge import config
from edge.cli import parser
from edge.validate import Field
from tests.conftest import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def spec_paths(spec, prefix=""):
    for key, field in spec.items():
        if isinstance(field, dict):
            yield from spec_paths(field, prefix + key + ".")
        else:
            yield prefix + key, field


def test_configuration_reference_lists_every_key_with_its_default():
    section = readme().split("## Configuration reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    documented = yaml.safe_load(block)
    for path, field in spec_paths(config.SPEC):
        node = documented
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, "README lacks config key " + path
            node = node[part]
        assert isinstance(field, Field)
        assert node == field.default, "README default of {} is {!r}, code says {!r}".format(
            path, node, field.default)


def test_every_subcommand_in_the_readme_exists():
    commands = set(parser()._subparsers._group_actions[0].choices)
    for name in re.findall(r"`edge (\w+)", readme()):
        assert name in commands, "README documents `edge {}`".format(name)
    for name in commands:
        assert "edge {}".format(name) in readme(), "README does not document edge " + name


# Programs the README may tell users to run beside `edge` and the repository's own files
# (tools/..., .venv/bin/...): those of every Ubuntu and JetPack system.
BASE_SYSTEM = {"sudo", "sh", "bash", "apt", "apt-get", "systemctl", "journalctl",
               "systemd-analyze", "nano", "python", "python3", "pip", "pip3", "git"}
# Programs that need installing, with what the README must say about where they come from.
INSTALL = {
    # (a code span may wrap: \s takes the line break)
    "mosquitto_pub": r"apt-get\s+install\s[^`]*mosquitto-clients",
    "mosquitto_sub": r"apt-get\s+install\s[^`]*mosquitto-clients",
    "polygraphy": r"pip\s+install\s[^`]*polygraphy",
    "trtexec": r"/usr/src/tensorrt/bin/trtexec",
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
    as it is, `.venv/bin/X` as X."""
    words = command.split()
    while words and (words[0] == "sudo" or re.match(r"^\w+=", words[0])):
        words = words[1:]
    name = words[0] if words else ""
    return name[len(".venv/bin/"):] if name.startswith(".venv/bin/") else name


def test_every_command_the_readme_runs_is_edge_or_says_how_to_install_it():
    """A user who follows the README has each program it runs: `edge` and the repository's
    tools, a base system's programs, or one the README says how to install (mosquitto_sub
    and mosquitto_pub are not in the `mosquitto` package the tools install)."""
    assert list(commands_in("Clear it with `mosquitto_pub -r -n -t T` (the `connection "
                            "lost` line, `tools/fleet N`)")) == [
        ("mosquitto_pub", "mosquitto_pub -r -n -t T")]
    text = readme()
    for name, command in commands_in(text):
        if name == "edge" or name in BASE_SYSTEM:
            continue
        if "/" in name:
            assert os.path.exists(os.path.join(ROOT, name)), "README runs {} ({})".format(
                name, command)
            continue
        assert name in INSTALL, "README tells users to run `{}`: use an edge command, or say " \
                                "how to install {} (and add it to INSTALL here)".format(
                                    command, name)
        assert re.search(INSTALL[name], text), "README runs `{}` without saying how to " \
                                               "install {} ({})".format(command, name,
                                                                        INSTALL[name])
