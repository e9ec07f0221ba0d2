"""The installed service (tools/install-jetson, systemd/edge.service): its config and folders.

`edge doctor` and `edge build` run beside the service. Without `-c` they read the installed
config when it exists and, for the folders it leaves null, use the service's own, so that a
check or a build fills the caches the service reads (a TensorRT build takes minutes) rather
than the caller's. Run as root, they first become the user that owns the service's state
folder (`edge`): what they write is the service's, as if it had written it itself.
"""

import logging
import os

logger = logging.getLogger(__name__)

CONFIG = "/etc/edge/edge.yaml"
# What edge.service gives the daemon: Environment=EDGE_MODEL_DIR=..., StateDirectory=edge.
FOLDERS = {"model_dir": "/var/cache/edge/models", "state_dir": "/var/lib/edge"}


def config_path(given):
    """The config to read: `-c FILE` when given, else the installed one when it exists."""
    if given:
        return given
    return CONFIG if os.path.isfile(CONFIG) else None


def folders(path):
    """The service's folders when `path` is the installed config, else None."""
    return dict(FOLDERS) if path == CONFIG else None


def become_owner(folder):
    """As root, switch this process to the user (and groups) owning `folder`, the service's
    state folder, when that is not root; the user's name, or None when nothing changed."""
    import pwd
    if os.geteuid() != 0:
        return None
    try:
        uid = os.stat(folder).st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        entry = pwd.getpwuid(uid)
        name, gid, home = entry.pw_name, entry.pw_gid, entry.pw_dir
        groups = os.getgrouplist(name, gid)    # video: the GPU and cameras
    except KeyError:                            # no passwd entry: the folder's group then
        name, gid, home, groups = str(uid), os.stat(folder).st_gid, folder, []
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    os.environ["HOME"] = home
    logger.info("running as %s, the owner of %s (the service's user)", name, folder)
    return name
