"""The engine cache: built artefacts (TensorRT engines, optimised ONNX models) by key.

The key hashes everything that invalidates an artefact: the rewritten model's bytes, the
backend's fingerprint (TensorRT version, GPU name and compute capability, L4T release, ...)
and the build options (precision, workspace); input shapes are in the model bytes. Files:

    {folder}/{card}-{W}x{H}[-ref{W}x{H}]-{backend}-{precision}-{key12}{suffix}
    {folder}/...{suffix}.json      side file: key, key material, size and sha256 of the file

Recipes: rewriting a graph needs onnx (about 14 MB of RSS) and a second or more. A side file
also records the artefact's `recipe_key`: a hash of what the rewritten model is made from
(the card, the model file's sha256, the frame size and dtype, the rewriting code, the
backend's fingerprint and build options), so a daemon whose engines are cached finds them
with `find` without rewriting anything, and never imports onnx. An artefact is still trusted
only for its full key (`lookup`); a recipe that no longer matches (a changed card, model,
rewriting code or edge version) finds nothing, and the graph is rewritten as before.

Writes are atomic (temporary file, fsync, rename; the side file last), so a killed build or a
full disk leaves either the previous artefact or none, never a torn one. `lookup` checks the
side file and the artefact's size and sha256 and removes what does not match: the caller
then rebuilds instead of crashing on a stale or corrupt engine.

Size: one engine per frame size (and reference size) adds up. Past `budget_mb` (config
`engine.cache_mb`) the least recently used artefacts are removed after each new one is
stored; use is the side file's mtime (touched on every lookup: atime is unreliable under
relatime/noatime). Never removed: artefacts this process looked up or stored and has not
loaded yet, and those whose engine is alive in this process (`hold`). Another process's
loaded engine may go: it keeps running from memory and is rebuilt at its next start.
"""

import hashlib
import json
import logging
import os
import re
import weakref

from edge.errors import CacheUnwritable
from edge.files import atomic_write, fsync_dir, remove_stale_temporaries

logger = logging.getLogger(__name__)

FORMAT = 1      # bump when the layout of artefacts or side files changes


def make_key(model_bytes, fingerprint, options):
    """(key hex, key material dict) for a rewritten model on a backend with build options."""
    material = {"format": FORMAT, "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
                "backend": fingerprint, "options": options}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), material


def recipe_key(recipe, fingerprint, options):
    """The key of an artefact made from `recipe` (a JSON-able dict of what the rewritten
    model is made from) on a backend with build options."""
    material = {"format": FORMAT, "recipe": recipe, "backend": fingerprint, "options": options}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))


def file_name(label, fingerprint, options, key, suffix):
    """A name a person can read: what, for which frames, where, how, and the key prefix."""
    return "{}-{}-{}-{}{}".format(_slug(label), _slug(fingerprint.get("backend", "x")),
                                  _slug(options.get("precision", "")), key[:12], suffix)


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unwritable(name, folder, error):
    """The error for an engine folder that cannot be written (a full disk, permissions)."""
    return CacheUnwritable("engine {}: cannot write it in {} ({}); free space there or set "
                      "engine.dir to another folder".format(name, folder,
                                                            error.strerror or error))


class EngineCache:
    """Artefacts of one backend under a folder, looked up by key."""

    def __init__(self, folder, budget_mb=None):
        self.folder = folder
        self.budget = None if budget_mb is None else budget_mb * 2 ** 20
        self._cleaned = False
        self._pinned = set()       # looked up or stored, not loaded yet
        self._held = {}            # path -> [weakref to a loaded Engine]

    def clean_leftovers(self):
        """Remove temporary files (`*.tmp.<pid>`) of processes that died while writing them
        (SIGKILL, power cut); they were never trusted, only taking space."""
        self._cleaned = True
        remove_stale_temporaries(self.folder)

    def paths(self, label, fingerprint, options, key, suffix):
        path = os.path.join(self.folder, file_name(label, fingerprint, options, key, suffix))
        return path, path + ".json"

    def lookup(self, path, key):
        """True when the artefact at path is complete and built for `key`; else cleans up."""
        if not self._cleaned:
            self.clean_leftovers()
        side = path + ".json"
        if not os.path.exists(path) and not os.path.exists(side):
            return False
        reason = None
        try:
            with open(side, "r", encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("key") != key:
                reason = "built for another key"
            elif os.path.getsize(path) != meta.get("size"):
                reason = "size {} instead of {} (truncated)".format(os.path.getsize(path),
                                                                    meta.get("size"))
            elif _sha256_file(path) != meta.get("sha256"):
                reason = "sha256 mismatch (corrupt)"
        except (OSError, ValueError) as e:
            reason = "unreadable ({})".format(getattr(e, "strerror", None) or e)
        if reason is None:
            self._used(path)
            return True
        logger.warning("cached engine %s is stale or damaged: %s; rebuilding it", path, reason)
        self.remove(path)
        return False

    def find(self, field, value):
        """(path, key, material) of an artefact whose side file records `field` == value (a
        `recipe_key` or a `card_key`), or None. Reads only the side files."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            return None
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.folder, name), "r", encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and isinstance(meta.get("material"), dict) and \
                    meta["material"].get(field) == value and isinstance(meta.get("key"), str):
                return os.path.join(self.folder, name[:-5]), meta["key"], meta["material"]
        return None

    def note(self, path, **fields):
        """Record fields (a recipe) in an artefact's side file; quietly nothing when it
        cannot be written (a read-only cache: the graph is then rewritten at each start)."""
        side = path + ".json"
        try:
            with open(side, "r", encoding="utf-8") as f:
                meta = json.load(f)
            if all(meta["material"].get(k) == v for k, v in fields.items()):
                return
            meta["material"].update(fields)
            atomic_write(side, json.dumps(meta, indent=1, sort_keys=True).encode())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def store(self, path, built_file, key, material):
        """Move a freshly built file into place, then write its side file (both atomic).

        A write that fails (a full disk) leaves neither: BuildError naming the folder.
        """
        try:
            os.makedirs(self.folder, exist_ok=True)
            with open(built_file, "rb") as f:
                os.fsync(f.fileno())
            meta = {"key": key, "size": os.path.getsize(built_file),
                    "sha256": _sha256_file(built_file), "material": material}
            # The side file goes last: without it (or with an old one) the artefact is not
            # trusted.
            side = path + ".json"
            if os.path.exists(side):
                os.unlink(side)
            os.replace(built_file, path)
            fsync_dir(self.folder)
            atomic_write(side, json.dumps(meta, indent=1, sort_keys=True).encode())
        except OSError as e:
            self.remove(path)
            raise unwritable(os.path.basename(path), self.folder, e)
        self._pinned.add(path)
        self.evict()

    def _used(self, path):
        """Mark an artefact as just used: pinned until loaded, and newest for the LRU."""
        self._pinned.add(path)
        try:
            os.utime(path + ".json")
        except OSError:            # a read-only cache: the order is then the build order
            pass

    def hold(self, path, engine):
        """`engine` was loaded from `path`: the artefact stays while the engine lives."""
        self._pinned.discard(path)
        refs = [r for r in self._held.get(path, []) if r() is not None]
        self._held[path] = refs + [weakref.ref(engine)]

    def in_use(self, path):
        """Whether this process still needs the artefact (see the module's docstring)."""
        return path in self._pinned or any(r() is not None for r in self._held.get(path, []))

    def evict(self):
        """Remove least recently used artefacts until they fit the budget, never one in use;
        the paths removed."""
        if self.budget is None:
            return []
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        entries = []               # (last use, bytes, path)
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.folder, name[:-5])
            try:
                entries.append((os.path.getmtime(path + ".json"),
                                os.path.getsize(path) + os.path.getsize(path + ".json"),
                                path))
            except OSError:        # a side file alone (or going): lookup cleans those
                continue
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.budget:
                break
            if self.in_use(path):
                continue
            self.remove(path)
            total -= size
            removed.append(path)
            logger.info("engine cache: removed %s (%.1f MiB), the least recently used, to stay "
                        "under engine.cache_mb (%.0f MiB)", os.path.basename(path),
                        size / 2.0 ** 20, self.budget / 2.0 ** 20)
        return removed

    def remove(self, path):
        for p in (path + ".json", path):
            try:
                os.unlink(p)
            except OSError:
                pass
