#!/usr/bin/env python3
"""Write edge/schemas/asyncapi.json, the JSON rendering of edge/schemas/asyncapi.yaml.

    python tools/render_schema_json.py          # rewrite it after editing the YAML
    python tools/render_schema_json.py --check  # exit 1 when it is not the YAML's rendering

A robot installs edge without PyYAML (the client needs paho-mqtt alone), so edge.schemas
reads the document from this rendering there; tests/test_packaging.py keeps the two equal.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from edge import files, schemas  # noqa: E402


def rendered():
    """The text asyncapi.json must hold: the YAML document, rendered."""
    with open(schemas.PATH, "r", encoding="utf-8") as f:
        return schemas.render_json(yaml.safe_load(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only say whether asyncapi.json is up to date")
    args = parser.parse_args(argv)
    text = rendered()
    try:
        with open(schemas.JSON_PATH, "r", encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if args.check:
        if current != text:
            print("{}: not the rendering of {}; run python3 tools/render_schema_json.py".format(
                os.path.relpath(schemas.JSON_PATH, ROOT), os.path.relpath(schemas.PATH, ROOT)),
                file=sys.stderr)
            return 1
        return 0
    if current != text:
        files.atomic_write(schemas.JSON_PATH, text.encode("utf-8"))
        print("wrote {}".format(os.path.relpath(schemas.JSON_PATH, ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
