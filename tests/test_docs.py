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
