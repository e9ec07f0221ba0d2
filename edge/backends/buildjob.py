"""The engine build child: `python -m edge.backends.buildjob` with a JSON spec on stdin.

Runs one backend's `build` and reports progress as JSON lines on the file descriptor the
parent passed (`events_fd`), so that library output on stdout/stderr cannot mix with them.
The parent (edge.backends.build) enforces the memory budget and turns failures into errors.
"""

import importlib
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1    # <linux/prctl.h>


def death_signal_preexec():
    """A `preexec_fn` for the build child's Popen that sets its parent-death signal between
    fork and exec, so no moment of the child's life is unsupervised (set from the child's own
    Python, it came after interpreter start-up: 1.5-2 s on a loaded Nano in which a killed
    daemon's build ran on). prctl is looked up here, in the parent: the function runs only
    libc calls in the forked child, taking no lock another thread could hold (what makes
    preexec_fn unsafe in threaded programs). None where prctl is not available."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):     # not Linux: die_with_parent and the watch remain
        return None
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec():
        prctl(PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:        # the parent died before prctl took effect
            os._exit(1)
    return preexec


def die_with_parent(parent_pid):
    """Have the kernel SIGKILL this process when the daemon dies (Linux): an orphaned build
    would go on holding the memory the daemon's restart needs."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):     # not Linux: the parent's watch still kills it
        return
    if os.getppid() != parent_pid:        # the parent was gone before prctl took effect
        os._exit(1)


def first_to_go():
    """Ask the kernel's OOM killer to pick this process first (oom_score_adj 1000, which any
    process may set for itself): when memory runs out during a build, the build dies, not the
    daemon, the desktop or sshd."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:                        # not Linux, or /proc read-only: nothing to adjust
        pass


def main():
    spec = json.loads(sys.stdin.read())
    if spec.get("parent"):
        die_with_parent(spec["parent"])
    first_to_go()
    events = os.fdopen(spec["events_fd"], "w", buffering=1)

    def emit(**event):
        events.write(json.dumps(event) + "\n")

    if spec.get("rlimit_as"):
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (spec["rlimit_as"], spec["rlimit_as"]))

    def progress(phase, fraction=None):
        emit(event="progress", phase=phase, fraction=fraction)

    try:
        progress("loading")
        importlib.import_module(spec["module"])
        from edge import backends
        cls = backends._cls(spec["backend"])
        cls.build(spec["onnx"], spec["out"], spec["options"], progress)
        emit(event="done")
        return 0
    except MemoryError as e:
        emit(event="error", kind="memory", message=str(e) or "MemoryError")
        return 3
    except Exception as e:  # reported to the parent as one line; the daemon stays up
        text = str(e).strip().splitlines()
        message = "{}: {}".format(type(e).__name__, text[0] if text else "")
        if "memory" in message.lower() or "bad_alloc" in message:
            emit(event="error", kind="memory", message=message)
            return 3
        emit(event="error", kind="build", message=message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
