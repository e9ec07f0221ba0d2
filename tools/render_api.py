"""Render the docs' MQTT API page (docs/mqtt-api.md) from edge/schemas/asyncapi.yaml.

    python tools/render_api.py           # rewrite docs/mqtt-api.md between the api markers
    python tools/render_api.py --check   # exit 1 when docs/mqtt-api.md is out of date

The section is: the topics table, one field table per message (path, type, description;
those the device publishes and `motion`, which robots send it),
the commands with their arguments and results, the replies and the error codes. Everything
comes from the document's descriptions: fix wording there, not in the page.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge import schemas  # noqa: E402

PAGE = os.path.join(ROOT, "docs", "mqtt-api.md")
HEADING = "# MQTT API"
BEGIN = "<!-- api:begin -->"
END = "<!-- api:end -->"
NOTE = ("<!-- Rendered by tools/render_api.py from edge/schemas/asyncapi.yaml: edit that file "
        "and run `python tools/render_api.py`. -->")
REF = "#/components/schemas/"
# The bound every integer has unless it says less (the document's description says so):
# not repeated in every row.
JSON_SAFE = 2 ** 53 - 1
# Fields every request has, documented once rather than per command.
COMMON_ARGUMENTS = ("id", "reply_to")


class Document:
    """The AsyncAPI document with $ref resolution."""

    def __init__(self, doc):
        self.doc = doc
        self.schemas = doc["components"]["schemas"]

    def resolve(self, node):
        """(schema, component name or None) with a leading $ref followed (siblings kept)."""
        name = None
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith(REF):
                raise ValueError("unsupported $ref {}".format(ref))
            name = ref[len(REF):]
            merged = dict(self.schemas[name])
            merged.update({k: v for k, v in node.items() if k != "$ref"})
            node = merged
        return node, name

    def message(self, ref):
        return self.doc["components"]["messages"][ref.rsplit("/", 1)[1]]


# -- text helpers ------------------------------------------------------------------------

def one_line(text):
    """A description as one line for a table cell."""
    return " ".join((text or "").split()).replace("|", "\\|")


def code(value):
    return "`{}`".format(json.dumps(value) if not isinstance(value, str) else value)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def example_json(payload):
    """An example payload: top-level keys one per line, values compact."""
    if not isinstance(payload, dict) or len(json.dumps(payload)) <= 90:
        return json.dumps(payload)
    items = ['  "{}": {}'.format(k, json.dumps(v)) for k, v in payload.items()]
    return "{\n" + ",\n".join(items) + "\n}"


# -- schemas as field tables ---------------------------------------------------------------

def plural(text):
    """`numbers`, `arrays of 5 numbers`, `(number or null)`: an item type inside `array of`."""
    if " or " in text or text.startswith("`"):
        return "({})".format(text)
    if text.startswith("array of "):
        return "arrays of " + text[len("array of "):]
    head, _, rest = text.partition(" ")
    return head + "s" + (" " + rest if rest else "")


def type_of(doc, node):
    """A short type for a schema: `string or null`, `array of 4 numbers`, `map of ... to ...`."""
    node, _ = doc.resolve(node)
    if "const" in node:
        return code(node["const"])
    for key in ("oneOf", "anyOf"):
        if key in node and "type" not in node:
            words = []
            for branch in node[key]:
                word = type_of(doc, branch)
                if word not in words:
                    words.append(word)
            return " or ".join(words)
    types = node.get("type", "any")
    types = types if isinstance(types, list) else [types]
    words = []
    for kind in types:
        if kind == "array" and "items" in node:
            count, most = node.get("minItems"), node.get("maxItems")
            size = "{} ".format(count) if count and count == most else \
                "up to {} ".format(most) if most else ""
            words.append("array of {}{}".format(size, plural(type_of(doc, node["items"]))))
        elif kind == "object" and isinstance(node.get("additionalProperties"), dict) and \
                not node.get("properties"):
            words.append("map of {} to {}".format(
                node.get("x-key", "name"), type_of(doc, node["additionalProperties"])))
        elif kind == "string" and "enum" in node:
            words.append(" \\| ".join(code(v) for v in node["enum"]))
        elif kind == "string" and "maxLength" in node:
            words.append("string of at most {} characters".format(node["maxLength"]))
        else:
            words.append(kind)
    text = " or ".join(words)
    low, high = node.get("minimum"), node.get("maximum")
    if high == JSON_SAFE:
        high = None
    if low is not None and high is not None:
        text += " {}..{}".format(low, high)
    elif low is not None:
        text += " >= {}".format(low)
    elif high is not None:
        text += " <= {}".format(high)
    if "pattern" in node:
        text += ", `{}`".format(node["pattern"].replace("|", "\\|"))
    return text


def describe(node):
    """The description of a field, with its enum values' meanings and its default."""
    text = one_line(node.get("description"))
    meanings = node.get("x-enumDescriptions")
    if meanings and node.get("x-enumTable"):
        text += " One of the codes in the table below."
    elif meanings:
        text += " " + "; ".join("`{}`: {}".format(k, one_line(v)) for k, v in meanings.items())
    if "default" in node:
        text += " Default {}.".format(code(node["default"]))
    if node.get("x-optional"):
        text += " (optional)"
    return text.strip()


def fields(doc, node, path="", required=True, skip=()):
    """Rows (path, type, description) for a schema and everything nested in it."""
    node, _ = doc.resolve(node)
    rows = []
    properties = node.get("properties") or {}
    needed = set(node.get("required") or [])
    for key, child in properties.items():
        if not path and key in skip:
            continue
        child_path = "{}.{}".format(path, key) if path else key
        resolved, _ = doc.resolve(child)
        text = describe(resolved)
        if key not in needed:
            text = "Optional. " + text
        rows.append(("`{}`".format(child_path), type_of(doc, child), text))
        rows += nested(doc, resolved, child_path)
    return rows


def nested(doc, node, path):
    """Rows for what is inside a field: object properties, array items, map values."""
    if node.get("properties"):
        return fields(doc, node, path)
    items = node.get("items")
    if isinstance(items, dict):
        item, _ = doc.resolve(items)
        if item.get("properties"):
            return fields(doc, item, path + "[]")
        if item.get("description"):
            return [("`{}[]`".format(path), type_of(doc, item), describe(item))]
    values = node.get("additionalProperties")
    if isinstance(values, dict):
        value, _ = doc.resolve(values)
        if value.get("properties"):
            return fields(doc, value, "{}.{{{}}}".format(path, node.get("x-key", "name")))
    return []


def field_table(doc, node, skip=()):
    rows = fields(doc, node, skip=skip)
    return table(("field", "type", "description"), rows)


# -- the section -----------------------------------------------------------------------------

def operation(channel):
    if "subscribe" in channel:
        return "device publishes", channel["subscribe"]
    return "clients publish", channel["publish"]


def relative(topic):
    return topic.replace("{prefix}/{device_id}/", "")


def topics(doc):
    lines = []
    wills = {b.get("lastWill", {}).get("topic") for s in doc.doc["servers"].values()
             for b in [s.get("bindings", {}).get("mqtt", {})]}
    rows = []
    for topic, channel in doc.doc["channels"].items():
        direction, op = operation(channel)
        binding = op.get("bindings", {}).get("mqtt", {})
        retained = "yes" if binding.get("retain") else "no"
        if topic in wills:
            retained += " (also the last will)"
        qos = "`{}` (default {})".format(op["x-qos"], binding.get("qos", 0)) if op.get("x-qos") \
            else str(binding.get("qos", 0))
        rows.append(("`{}`".format(relative(topic)), direction, retained, qos,
                     one_line(op.get("summary"))))
    lines.append(table(("topic", "direction", "retained", "QoS", "what"), rows))
    lines.append("")
    for topic, channel in doc.doc["channels"].items():
        lines.append("- `{}`: {}".format(relative(topic), one_line(channel.get("description"))))
    return lines


def message_section(doc, topic):
    channel = doc.doc["channels"][topic]
    _, op = operation(channel)
    message = doc.message(op["message"]["$ref"])
    payload, _ = doc.resolve(message["payload"])
    lines = ["### `{}`".format(relative(topic)), "", one_line(payload.get("description")), ""]
    for example in message.get("examples", [])[:1]:
        lines += ["```json", example_json(example["payload"]), "```", ""]
    lines.append(field_table(doc, message["payload"]))
    return lines


def commands_section(doc):
    channel = doc.doc["channels"]["{prefix}/{device_id}/cmd/{command}"]
    messages = [doc.message(m["$ref"]) for m in channel["publish"]["message"]["oneOf"]]
    payload_schemas = {m["payload"]["$ref"] for m in
                       (doc.message(c["subscribe"]["message"]["$ref"])
                        for c in doc.doc["channels"].values()
                        if "$ref" in c.get("subscribe", {}).get("message", {}))}
    lines = ["### Commands", "", one_line(channel.get("description")), "",
             "Every request has these fields:", ""]
    first, _ = doc.resolve(messages[0]["payload"])
    common = {"properties": {k: first["properties"][k] for k in COMMON_ARGUMENTS},
              "required": ["id"]}
    lines += [field_table(doc, common), ""]
    rows = []
    for message in messages:
        request, _ = doc.resolve(message["payload"])
        arguments = [k for k in request["properties"] if k not in COMMON_ARGUMENTS]
        rows.append(("`{}`".format(message["name"]),
                     ", ".join("`{}`".format(a) for a in arguments) or "-",
                     one_line(message.get("summary"))))
    lines += [table(("command", "arguments", "what it does"), rows), ""]
    for message in messages:
        request, _ = doc.resolve(message["payload"])
        lines += ["#### `{}`".format(message["name"]), "", one_line(message.get("summary")), ""]
        example = message.get("examples", [{}])[0].get("payload")
        if example is not None:
            lines += ["Request on `cmd/{}`: `{}`".format(message["name"], json.dumps(example)), ""]
        if any(k not in COMMON_ARGUMENTS for k in request["properties"]):
            lines += ["Arguments:", "", field_table(doc, request, skip=COMMON_ARGUMENTS), ""]
        result_ref = message["x-result"]["$ref"]
        result, _ = doc.resolve(message["x-result"])
        if result_ref in payload_schemas:
            topic = next(t for t, c in doc.doc["channels"].items()
                         if c.get("subscribe", {}).get("message", {}).get("$ref") and
                         doc.message(c["subscribe"]["message"]["$ref"])["payload"]["$ref"] ==
                         result_ref)
            lines += ["Result: {} (the message of the `{}` topic, above).".format(
                one_line(result.get("description")).rstrip("."), relative(topic)), ""]
        else:
            lines += ["Result: {}".format(one_line(result.get("description"))), "",
                      field_table(doc, message["x-result"]), ""]
        errors = message.get("x-errors") or []
        if errors:
            lines += ["Errors of its own: {}.".format(", ".join("`{}`".format(e) for e in errors)),
                      ""]
    return lines


def replies_section(doc):
    channel = doc.doc["channels"]["{prefix}/{device_id}/reply/{id}"]
    ok, error = [doc.message(m["$ref"]) for m in channel["subscribe"]["message"]["oneOf"]]
    lines = ["### Replies", "", one_line(channel.get("description")), ""]
    for message in (ok, error):
        payload, _ = doc.resolve(message["payload"])
        lines += ["{}:".format(one_line(payload.get("description")).rstrip(".")), "",
                  "```json", json.dumps(message["examples"][0]["payload"]), "```", "",
                  field_table(doc, message["payload"]), ""]
    codes, _ = doc.resolve({"$ref": REF + "ErrorCode"})
    general = doc.doc["channels"]["{prefix}/{device_id}/cmd/{command}"]["publish"]["x-errors"]
    lines += ["Error codes (`error.code`); any command may get {}:".format(
        ", ".join("`{}`".format(c) for c in general)), ""]
    rows = [("`{}`".format(c), one_line(codes["x-enumDescriptions"][c])) for c in codes["enum"]]
    lines.append(table(("code", "meaning"), rows))
    return lines


def render(doc=None):
    """The text between the markers (markers included)."""
    doc = Document(doc or schemas.document())
    info = doc.doc["info"]
    lines = [BEGIN, NOTE, "", info["description"].strip(), ""]
    lines += topics(doc) + [""]
    for topic in ("status", "detections", "depth", "matches", "health", "events", "motion"):
        lines += message_section(doc, "{prefix}/{device_id}/" + topic) + [""]
    lines += commands_section(doc)
    lines += replies_section(doc)
    lines.append(END)
    return "\n".join(line.rstrip() for line in lines)


def updated(readme, block):
    """The page's text with the API section's body replaced by `block`."""
    if BEGIN in readme and END in readme:
        start = readme.index(BEGIN)
        end = readme.index(END) + len(END)
        return readme[:start] + block + readme[end:]
    lines = readme.split("\n")
    if HEADING not in lines:
        raise SystemExit("render_api: no {!r} heading in docs/mqtt-api.md".format(HEADING))
    start = lines.index(HEADING) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + ["", block, ""] + lines[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/mqtt-api.md is not what this would write")
    parser.add_argument("--page", "--readme", dest="readme", default=PAGE,
                        help="the page to update (default docs/mqtt-api.md)")
    args = parser.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        current = f.read()
    new = updated(current, render())
    if args.check:
        if new != current:
            print("render_api: {} is out of date; run python tools/render_api.py".format(
                args.readme), file=sys.stderr)
            return 1
        return 0
    if new != current:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
        print("render_api: updated {}".format(args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
