#!/usr/bin/env python3
"""Render edge's broker access rules from the API document and a roster of accounts.

    python tools/render_broker.py            # rewrite the examples: systemd/mosquitto-acl,
                                             # mosquitto-central-acl, the bridge topics of
                                             # mosquitto-site.conf, the table of docs/broker.md
    python tools/render_broker.py --check    # exit 1 when one of them is out of date
    python tools/render_broker.py --roster fleet.yaml --acl /etc/mosquitto/edge-acl [--site S]
    python tools/render_broker.py --roster fleet.yaml --central-acl /etc/mosquitto/edge-central-acl
    python tools/render_broker.py --roster fleet.yaml --bridge-topics -

Every channel of edge/schemas/asyncapi.yaml is given its writer and readers here (by its
operationId); a channel this script does not know is an error, so a topic cannot enter the
API document without entering the ACLs and the bridge. Each right is given to one user name
(no `pattern` lines: a pattern applies to every user, whatever kind of account it is).
Runs with Python 3.6 and PyYAML, on the broker's host too.
"""

import argparse
import collections
import os
import re
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "edge", "schemas", "asyncapi.yaml")
ROSTER = os.path.join(ROOT, "systemd", "broker-roster.yaml")
SITE_ACL = os.path.join(ROOT, "systemd", "mosquitto-acl")
CENTRAL_ACL = os.path.join(ROOT, "systemd", "mosquitto-central-acl")
SITE_CONF = os.path.join(ROOT, "systemd", "mosquitto-site.conf")
DOC = os.path.join(ROOT, "docs", "broker.md")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")
PARAMETER = re.compile(r"\{([a-z_]+)\}")
KINDS = ("devices", "robots", "operators", "sites")

# Who reads what a device publishes, by the operationId of its channel: results and state go
# to robots and operators, the answers to commands to operators only.
DEVICE_PUBLISHES = {
    "status": ("robots", "operators"),
    "health": ("robots", "operators"),
    "detections": ("robots", "operators"),
    "detections_of_camera": ("robots", "operators"),
    "matches": ("robots", "operators"),
    "matches_of_camera": ("robots", "operators"),
    "events": ("robots", "operators"),
    "events_of_camera": ("robots", "operators"),
    "depth": ("robots", "operators"),
    "depth_of_camera": ("robots", "operators"),
    "reply": ("operators",),
    "snapshot": ("operators",),
}
# What clients publish to devices, by the operationId of its channel, and who writes it:
# commands come from operators, the camera's rotation (`motion`) from robots, whose cameras
# the devices watch. The device a topic names reads it (every device, for a topic without
# {device_id}), and operators too (to see what was asked and sent).
CLIENTS_PUBLISH = {
    "command": "operators",
    "broadcast": "operators",
    "motion": "robots",
    "motion_of_camera": "robots",
}
# Topics outside the document's channels. `edge health` replies: the `reply` channel names
# this topic (its description must keep naming it); a device writes its own.
HEALTH_REPLY = "{prefix}/_health/{session}/{device_id}"
# A bridge's link state on the central broker (mosquitto-site.conf: notifications true, the
# bridge's client id = the site's name).
LINK_STATE = "$SYS/broker/connection/{site}/state"

BRIDGE_BEGIN = "# topics:begin"
BRIDGE_END = "# topics:end"
DOC_BEGIN = "<!-- rights:begin -->"
DOC_END = "<!-- rights:end -->"

# template: the topic with {parameters}; writer and readers: "device" (the device the topic
# names, every device where it names none), "robots", "operators", "site" (the bridge whose
# devices these are, or whose state this is); central: on the central broker only.
Channel = collections.namedtuple("Channel", "template operation writer readers central")


class RenderError(Exception):
    """A roster or an API document this script cannot render, for people."""


# -- the rights -------------------------------------------------------------------------

def load_api(path=API):
    """The API document (libyaml's loader where PyYAML has it: 10 times faster)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def channels(doc):
    """Every topic of the API document (and the broker's own two) with who writes and reads it."""
    result, unknown = [], []
    for template, item in doc["channels"].items():
        if "subscribe" in item:             # AsyncAPI 2: the device publishes, clients subscribe
            operation = item["subscribe"].get("operationId")
            if operation not in DEVICE_PUBLISHES:
                unknown.append("{} (operationId {}; the device publishes)".format(
                    template, operation))
                continue
            if not template.startswith("{prefix}/{device_id}/"):
                raise RenderError("{}: a device publishes only under {{prefix}}/{{device_id}}/"
                                  ", its own topics".format(template))
            result.append(Channel(template, operation, "device", DEVICE_PUBLISHES[operation],
                                  False))
        if "publish" in item:               # clients publish, the device receives
            operation = item["publish"].get("operationId")
            if operation not in CLIENTS_PUBLISH:
                unknown.append("{} (operationId {}; clients publish)".format(template, operation))
                continue
            result.append(Channel(template, operation, CLIENTS_PUBLISH[operation],
                                  ("device", "operators"), False))
    if unknown:
        raise RenderError("channels of the API document without rights in tools/render_broker"
                          ".py: {}; add each operationId to DEVICE_PUBLISHES (who reads it) or "
                          "CLIENTS_PUBLISH (who writes it)".format("; ".join(unknown)))
    replies = [item for item in doc["channels"].values()
               if item.get("subscribe", {}).get("operationId") == "reply"]
    if not replies or HEALTH_REPLY not in replies[0].get("description", ""):
        raise RenderError("the `reply` channel of the API document no longer names {}: "
                          "update HEALTH_REPLY in tools/render_broker.py".format(HEALTH_REPLY))
    result.append(Channel(HEALTH_REPLY, "health_reply", "device", ("operators",), False))
    result.append(Channel(LINK_STATE, "link_state", "site", ("operators",), True))
    return result


def topic_filter(template, prefix, device="+", site="+"):
    """A channel's topic filter: each {parameter} one level, `+` unless given."""
    values = {"prefix": prefix, "device_id": device, "site": site}
    return PARAMETER.sub(lambda m: values.get(m.group(1), "+"), template)


def device_rights(chans, prefix, device):
    """[(access, filter)] of a device's own account (user name = device id)."""
    rights = []
    for c in chans:
        if c.central:
            continue
        if c.writer == "device":
            rights.append(("write", topic_filter(c.template, prefix, device)))
        if "device" in c.readers:
            rights.append(("read", topic_filter(c.template, prefix, device)))
    return rights


def client_rights(chans, prefix, kind, central):
    """[(access, filter)] of a robot's or an operator's account: every device's topics."""
    rights = []
    for c in chans:
        if c.central and not central:
            continue
        if c.writer == kind:
            rights.append(("write", topic_filter(c.template, prefix)))
        if kind in c.readers:
            rights.append(("read", topic_filter(c.template, prefix)))
    return rights


def site_rights(chans, prefix, site, devices):
    """[(access, filter)] of a site's bridge on the central broker: its devices' rights and
    its own link state."""
    rights = []
    for device in devices:
        rights.extend(device_rights(chans, prefix, device))
    for c in chans:
        if c.writer == "site":
            rights.append(("write", topic_filter(c.template, prefix, site=site)))
    return rights


def covers(wide, narrow):
    """Whether every topic matching filter `narrow` matches filter `wide`."""
    w, n = wide.split("/"), narrow.split("/")
    if n[0].startswith("$") and w[0] in ("+", "#"):
        return False                        # wildcards never match $SYS and the like
    for i, level in enumerate(w):
        if level == "#":
            return True                     # (`a/#` matches `a` as well)
        if i >= len(n) or n[i] == "#" or (level != "+" and level != n[i]):
            return False
    return len(w) == len(n)


def merged(rights):
    """[(access, filter)]: read and write of one filter as `readwrite`, in first-seen order,
    without filters a broader one of the same (or more) access already grants."""
    access = collections.OrderedDict()
    for kind, topic in rights:
        access.setdefault(topic, set()).add(kind)
    kept = [(topic, kinds) for topic, kinds in access.items()
            if not any(other != topic and covers(other, topic) and kinds <= more
                       for other, more in access.items())]
    return [("readwrite" if len(kinds) == 2 else next(iter(kinds)), topic)
            for topic, kinds in kept]


def bridge_topics(chans, prefix):
    """The bridge's `topic` lines: out what devices publish, in what clients send them."""
    out = [topic_filter(c.template, prefix) for c in chans
           if c.writer == "device" and not c.central]
    into = [topic_filter(c.template, prefix) for c in chans
            if c.writer in ("operators", "robots") and not c.central]
    lines = ["topic {} out 1".format(t) for _, t in merged(("write", t) for t in out)]
    lines += ["topic {} in 1".format(t) for _, t in merged(("read", t) for t in into)]
    return lines


# -- the roster -------------------------------------------------------------------------

def load_roster(path):
    """The accounts of a roster file, checked: {prefix, devices, robots, operators, sites}."""
    where = os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) \
        else path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise RenderError("{}: {}".format(where, e))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RenderError("{}: must be a mapping of prefix, {}".format(where, ", ".join(KINDS)))
    extra = sorted(set(data) - set(KINDS) - {"prefix"})
    if extra:
        raise RenderError("{}: unknown key {}; the keys are prefix, {}".format(
            where, ", ".join(map(repr, extra)), ", ".join(KINDS)))
    prefix = data.get("prefix", "edge")
    if not isinstance(prefix, str) or not PREFIX.match(prefix):
        raise RenderError("{}: prefix: {!r} is no topic prefix (MQTT levels of letters, digits"
                          ", _ . -)".format(where, prefix))
    roster = {"prefix": prefix}
    kind_of = {}

    def account(kind, key, name):
        if not isinstance(name, str) or not NAME.match(name):
            raise RenderError("{}: {}: {!r} is no user name: 1-64 letters, digits, _ . -, "
                              "starting with a letter or a digit".format(where, key, name))
        if name in kind_of:
            raise RenderError("{}: {}: {!r} is already one of the {}: every account has one "
                              "kind and one name".format(where, key, name, kind_of[name]))
        kind_of[name] = kind

    for kind in ("devices", "robots", "operators"):
        names = data.get(kind) or []
        if not isinstance(names, list):
            raise RenderError("{}: {}: must be a list of user names".format(where, kind))
        for i, name in enumerate(names):
            account(kind, "{}[{}]".format(kind, i), name)
        roster[kind] = list(names)
    sites = data.get("sites") or {}
    if not isinstance(sites, dict):
        raise RenderError("{}: sites: must map each site's name to its devices".format(where))
    site_of = {}
    for site, devices in sites.items():
        account("sites", "sites", site)
        if not isinstance(devices, list):
            raise RenderError("{}: sites.{}: must be a list of devices".format(where, site))
        for device in devices:
            if kind_of.get(device) != "devices":
                raise RenderError("{}: sites.{}: {!r} is not in devices: list it there".format(
                    where, site, device))
            if device in site_of:
                raise RenderError("{}: sites.{}: {!r} is already behind {}: a device belongs "
                                  "to one site".format(where, site, device, site_of[device]))
            site_of[device] = site
    roster["sites"] = collections.OrderedDict((site, list(devices))
                                              for site, devices in sites.items())
    return roster


# -- the files --------------------------------------------------------------------------

def _header(source, lines):
    text = ["Rendered by tools/render_broker.py from edge/schemas/asyncapi.yaml (every topic of",
            "the API) and {} (the accounts): do not edit; render your own".format(source),
            "from a copy of the roster (docs/broker.md).", ""] + lines
    return "".join("# {}\n".format(line) if line else "#\n" for line in text)


_ACL_NOTES = [
    "",
    "Who reads and writes what: docs/broker.md. Each right belongs to one user name; there are",
    "no `pattern` lines, which would apply to every user (`pattern write edge/%u/#` lets a robot",
    "publish under edge/<its name>/ as if it were a device). A {parameter} of a topic is one",
    "level, `+`. Mosquitto refuses whatever is not granted: a publish to a topic the client may",
    "not write is acknowledged and dropped (MQTT 3.1.1 has no error for it); a subscription",
    "delivers only what the client may read.",
]


def _user_block(name, rights):
    return "user {}\n".format(name) + "".join("topic {} {}\n".format(access, topic)
                                              for access, topic in merged(rights))


def render_acl(roster, chans, source, site=None):
    """The acl_file of a broker that devices connect to (one site's devices with `site`)."""
    prefix = roster["prefix"]
    devices = roster["devices"] if site is None else roster["sites"][site]
    where = ("the broker of site {}".format(site) if site else
             "mosquitto.conf: one broker, or a site's (mosquitto-site.conf)")
    parts = [_header(source, ["Mosquitto acl_file of a broker the devices connect to:",
                              where + "."] + _ACL_NOTES)]
    parts.append("\n# --- devices: user name = device id; its own topics only\n")
    parts += ["\n" + _user_block(d, device_rights(chans, prefix, d)) for d in devices]
    parts.append("\n# --- robots: results and state of every device, the motion of its "
                 "cameras; no commands\n")
    parts += ["\n" + _user_block(r, client_rights(chans, prefix, "robots", False))
              for r in roster["robots"]]
    parts.append("\n# --- operators: commands to every device and what devices publish\n")
    parts += ["\n" + _user_block(o, client_rights(chans, prefix, "operators", False))
              for o in roster["operators"]]
    return "".join(parts)


def render_central_acl(roster, chans, source):
    """The acl_file of the central broker: sites' bridges, robots and operators."""
    prefix = roster["prefix"]
    parts = [_header(source, [
        "Mosquitto acl_file of the central broker (mosquitto-central.conf). Sites connect as",
        "bridges (mosquitto-site.conf) with user name = client id = the site's name; devices",
        "never connect here. A site writes only its own devices' topics and its own link state,",
        "and reads only its own devices' commands."] + _ACL_NOTES)]
    parts.append("\n# --- sites (bridges): their devices' topics, their own link state\n")
    parts += ["\n" + _user_block(s, site_rights(chans, prefix, s, devices))
              for s, devices in roster["sites"].items()]
    parts.append("\n# --- robots: results and state of every device, the motion of its "
                 "cameras; no commands\n")
    parts += ["\n" + _user_block(r, client_rights(chans, prefix, "robots", True))
              for r in roster["robots"]]
    parts.append("\n# --- operators: commands to every device, what devices publish, link states\n")
    parts += ["\n" + _user_block(o, client_rights(chans, prefix, "operators", True))
              for o in roster["operators"]]
    return "".join(parts)


def _cell(channel, who):
    """What an account of kind `who` may do with a channel, for the table of docs/broker.md."""
    own = "{device_id}" in channel.template
    if who == "site":
        does = []
        if channel.writer == "site":
            does.append("writes its own")
        if channel.writer == "device":
            does.append("writes its devices'")
        if "device" in channel.readers:
            does.append("reads its devices'" if own else "reads")
        return ", ".join(does) or "-"
    if channel.central and who == "device":
        return "-"
    does = []
    if channel.writer == who:
        does.append("writes its own" if who == "device" else "writes")
    if who in channel.readers:
        does.append("reads its own" if who == "device" and own else "reads")
    return ", ".join(does) or "-"


def render_table(chans):
    rows = ["| topic | device | robots | operators | site (bridge, central broker) |",
            "| --- | --- | --- | --- | --- |"]
    for c in chans:
        topic = "`{}`{}".format(c.template, " (central broker)" if c.central else "")
        rows.append("| {} | {} |".format(topic, " | ".join(
            _cell(c, who) for who in ("device", "robots", "operators", "site"))))
    return "\n".join(rows) + "\n"


def replaced(text, begin, end, body, where):
    """`text` with the lines between the line starting with `begin` and the one starting
    with `end` set to `body`."""
    start = text.find(begin)
    stop = text.find("\n" + end, start) + 1
    if start < 0 or stop <= 0 or (start > 0 and text[start - 1] != "\n"):
        raise RenderError("{}: the marker lines {}... and {}... are missing".format(
            where, begin, end))
    return text[:text.index("\n", start) + 1] + body + text[stop:]


def examples(api=API, roster_path=ROSTER):
    """{path: text} of the shipped example files, as this script renders them."""
    chans = channels(load_api(api))
    roster = load_roster(roster_path)
    source = "systemd/broker-roster.yaml"
    result = {SITE_ACL: render_acl(roster, chans, source),
              CENTRAL_ACL: render_central_acl(roster, chans, source)}
    with open(SITE_CONF, encoding="utf-8") as f:
        result[SITE_CONF] = replaced(f.read(), BRIDGE_BEGIN, BRIDGE_END, "\n".join(
            bridge_topics(chans, roster["prefix"])) + "\n", "systemd/mosquitto-site.conf")
    with open(DOC, encoding="utf-8") as f:
        result[DOC] = replaced(f.read(), DOC_BEGIN, DOC_END, render_table(chans),
                               "docs/broker.md")
    return result


def write(path, text):
    """Write a file atomically (mosquitto may reload it at any moment), or to stdout for `-`."""
    if path == "-":
        sys.stdout.write(text)
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".render-broker-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a shipped example is not what this would write")
    parser.add_argument("--roster", help="the accounts (YAML, as systemd/broker-roster.yaml)")
    parser.add_argument("--acl", help="write the acl_file of a broker devices connect to here "
                        "(- for stdout)")
    parser.add_argument("--site", help="with --acl: only the devices of this site")
    parser.add_argument("--central-acl", help="write the central broker's acl_file here")
    parser.add_argument("--bridge-topics", help="write a site bridge's `topic` lines here")
    args = parser.parse_args(argv)
    try:
        if not (args.acl or args.central_acl or args.bridge_topics):
            if args.roster or args.site:
                parser.error("--roster and --site need --acl, --central-acl or --bridge-topics")
            stale = []
            for path, text in examples().items():
                with open(path, encoding="utf-8") as f:
                    current = f.read()
                if current != text:
                    stale.append(os.path.relpath(path, ROOT))
                    if not args.check:
                        write(path, text)
            if stale:
                print("render_broker: {} {}".format(
                    "out of date (run python tools/render_broker.py):" if args.check
                    else "updated", ", ".join(stale)), file=sys.stderr)
            return 1 if stale and args.check else 0
        if args.check:
            parser.error("--check compares the shipped examples only")
        roster_path = args.roster or ROSTER
        roster = load_roster(roster_path)
        if args.site is not None and args.site not in roster["sites"]:
            raise RenderError("--site {!r}: {} names the sites {}".format(
                args.site, roster_path, ", ".join(roster["sites"]) or "(none)"))
        chans = channels(load_api())
        if args.acl:
            write(args.acl, render_acl(roster, chans, roster_path, args.site))
        if args.central_acl:
            write(args.central_acl, render_central_acl(roster, chans, roster_path))
        if args.bridge_topics:
            write(args.bridge_topics, "\n".join(bridge_topics(chans, roster["prefix"])) + "\n")
        return 0
    except RenderError as e:
        print("render_broker: error: {}".format(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
