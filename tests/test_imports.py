"""The house's shape: no import circle inside edge/, counting the imports inside functions
too (a lazy import only hides a circle until both modules are loaded).

One kind of circle is the design: a registry package imports its own plugin modules (to
register them) and they import the package (for its `register`). Every other circle fails,
naming the modules. And no module outside the task registry tests a task's kind by name."""

import ast
import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

EDGE = os.path.join(ROOT, "edge")


def modules():
    """{dotted name: path} of every module in edge/."""
    found = {}
    for folder, _, files in os.walk(EDGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[:-len(".__init__")]
                found[dotted] = path
    return found


def import_graph():
    """{module: modules of edge it imports anywhere in its text}."""
    found = modules()
    graph = {}
    for dotted, path in found.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = dotted if path.endswith("__init__.py") else dotted.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in found)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] +
                                    ([node.module] if node.module else []))
                for alias in node.names:
                    full = base + "." + alias.name
                    if full in found:
                        targets.add(full)
                    elif base in found:
                        targets.add(base)
        graph[dotted] = targets - {dotted}
    return graph


def registry_edge(a, b):
    """A package and one of its own modules (either way round)."""
    return a.rsplit(".", 1)[0] == b or b.rsplit(".", 1)[0] == a


def cycles(graph):
    """The circles of the graph without registry edges: lists of modules, each a path that
    ends where it starts."""
    graph = {a: {b for b in targets if not registry_edge(a, b)} for a, targets in graph.items()}
    found = []
    done = set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in path and nxt not in done:
                    stack.append((nxt, path + [nxt]))
        done.add(start)
    return found


def test_no_import_circle_inside_edge():
    circles = cycles(import_graph())
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles[:5])


def test_the_check_finds_a_circle_made_of_lazy_imports():
    graph = {"edge.bench": {"edge.benchdepth"}, "edge.benchdepth": {"edge.bench"},
             "edge.tasks": {"edge.tasks.detect"}, "edge.tasks.detect": {"edge.tasks"}}
    assert cycles(graph) == [["edge.bench", "edge.benchdepth", "edge.bench"]]
    # and the graph reads imports inside functions (cli imports the daemon lazily)
    assert "edge.daemon" in import_graph()["edge.cli"]


def kind_tests(path):
    """Lines of a module that test a task's kind: a comparison with a kind's name, or a
    mapping keyed by one."""
    from edge import tasks
    names = {cls.name for cls in tasks.kinds()}
    with open(path) as f:
        tree = ast.parse(f.read(), path)

    def kind_name(node):
        return isinstance(node, ast.Constant) and node.value in names

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq))
                                                 for op in node.ops):
            sides = [node.left] + node.comparators
            if any(kind_name(s) for s in sides):
                found.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(kind_name(k) for k in node.keys if k):
            found.append(node.lineno)
    return found


def test_no_module_outside_the_tasks_tests_a_tasks_kind():
    """The daemon, the CLI, doctor, the memory plan, health and the commands ask the task
    registry (edge.tasks: KINDS, kinds, kind, card_names and each kind's class attributes)
    and never a kind by name; so do the configuration's schema and the parser."""
    found = {}
    for dotted, path in modules().items():
        if dotted.startswith(("edge.tasks", "edge.families")):
            continue
        lines = kind_tests(path)
        if lines:
            found[os.path.relpath(path, ROOT)] = lines
    assert not found, "modules that test a task's kind (file: lines): {}".format(found)


def test_a_kind_declared_in_the_registry_has_its_config_key_flag_and_section():
    """Adding a kind is its module and its declaration: the schema and the parser follow."""
    code = textwrap.dedent("""
        import sys
        from edge import tasks
        from edge.validate import Field
        tasks.KINDS += (tasks.Kind("count", "counter", "counting card name or path",
                                   "yolox-nano-count",
                                   ("count", {"every": Field(int, default=1, min=1)})),)
        from edge import cli, config
        args = cli.parser().parse_args(["run", "--counter", "my-card"])
        cfg = config.load(None, {"counter": args.counter, "count.every": 3})
        print(cfg["counter"], cfg["count"]["every"], tasks.card_names(cfg))
        try:
            config.load(None, {"count.every": 0, "detector": "yolox-nano"})
        except Exception as e:
            print(e)
        try:
            config.load(None, {})
        except Exception as e:
            print(e)
        """)
    out = subprocess.check_output([sys.executable, "-c", code], cwd=ROOT,
                                  universal_newlines=True).splitlines()
    assert out[0] == "my-card 3 ['my-card']"
    assert "count.every" in out[1]
    assert "counter (e.g. yolox-nano-count)" in out[2]


def test_the_kind_check_finds_a_kind_test(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f(card, task):\n    if card.task == 'match':\n        return 1\n"
                    "    return {'detect': 1}[task]\n")
    assert kind_tests(str(path)) == [2, 4]


# What a running pipeline and the builds are made of: observers read Pipeline.snapshot()
# and build.states() instead.
INTERNALS = {"inboxes", "lanes", "runners", "capture", "camera_stats", "STATES"}
OBSERVERS = ("health.py", "metrics.py")


def internals_read(path):
    """Lines of a module that read one of INTERNALS as an attribute."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return sorted({node.lineno for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr in INTERNALS})


def test_observers_read_snapshots_not_the_pipelines_insides():
    found = {name: internals_read(os.path.join(EDGE, name)) for name in OBSERVERS}
    assert not any(found.values()), "health/metrics read the pipeline's insides: {}".format(
        found)


# What health and metrics may use of the daemon they observe: its snapshot (edge.daemon
# DaemonView), its health report (metrics), and the outputs health's report goes to.
DAEMON_USES = {"health.py": {"snapshot", "link", "publisher"},
               "metrics.py": {"snapshot", "health"}}


def daemon_reads(path):
    """{attribute: [lines]} of what a module reads of `app` or `self.app`."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "app") or (
                isinstance(owner, ast.Attribute) and owner.attr == "app"):
            found.setdefault(node.attr, []).append(node.lineno)
    return found


def test_observers_read_the_daemons_snapshot_not_its_parts():
    for name, allowed in DAEMON_USES.items():
        reads = daemon_reads(os.path.join(EDGE, name))
        assert "snapshot" in reads, name
        extra = {attr: lines for attr, lines in reads.items() if attr not in allowed}
        assert not extra, "{} reads the daemon's parts: {}".format(name, extra)
