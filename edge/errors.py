"""Errors meant for people: one line naming the thing, the place and the fix, plus an exit code.

Exit codes follow BSD sysexits where one fits, so scripts and systemd can tell them apart.
"""

EXIT_OK = 0
EXIT_FAILURE = 1        # an unexpected internal error (a bug): traceback with --debug
EXIT_USAGE = 2          # bad command line (argparse)
EXIT_DATAERR = 65       # a model, engine, image or detections file is corrupt or of the wrong kind
EXIT_NOINPUT = 66       # the source cannot be opened or read
EXIT_UNAVAILABLE = 69   # a network service (broker, model download) cannot be reached
EXIT_SOFTWARE = 70      # an engine could not be built
EXIT_IOERR = 74         # a file cannot be written (JSONL sink, model folder)
EXIT_CONFIG = 78        # the configuration (or the install) is invalid: systemd must not
                        # restart in a loop


class EdgeError(Exception):
    """An error with a message a user can act on and the exit code it maps to."""

    exit_code = EXIT_FAILURE


class ConfigError(EdgeError):
    """Invalid configuration, model card or command line value."""

    exit_code = EXIT_CONFIG


class InstallError(EdgeError):
    """The install lacks what a command needs (a robot's client install runs no daemon)."""

    exit_code = EXIT_CONFIG


class ModelError(EdgeError):
    """A model file that is missing, truncated, corrupt or does not match its card."""

    exit_code = EXIT_DATAERR


class DataError(EdgeError):
    """An input file that is not in its format (`edge track`'s detections)."""

    exit_code = EXIT_DATAERR


class SourceError(EdgeError):
    """A source that cannot be opened or read."""

    exit_code = EXIT_NOINPUT


class UnavailableError(EdgeError):
    """A network service that cannot be reached (broker, model download)."""

    exit_code = EXIT_UNAVAILABLE


class BuildError(EdgeError):
    """An engine could not be built (parser error, out of memory, crash)."""

    exit_code = EXIT_SOFTWARE


class CacheUnwritable(BuildError):
    """The engine folder cannot be written (a full disk, read-only): nothing can be cached."""


class SinkError(EdgeError):
    """An output that cannot be written (JSONL file)."""

    exit_code = EXIT_IOERR
