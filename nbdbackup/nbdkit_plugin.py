"""nbdkit Python plugin: disks of one backup point as read-only NBD exports.

Loaded by nbdkit's embedded Python (`nbdkit python nbdkit_plugin.py ...`),
never imported by nbdbackup itself.  All reading is BackupImage's (and so the
Repository API's): this file only translates nbdkit's callbacks.

Parameters (serving.py builds them):
    path=DIR:DIR...   sys.path entries of the nbdbackup that started nbdkit
    repo=LOCATION     repository, as nbdbackup's --repo takes it
    config=FILE       nbdbackup configuration file ("" for none)
    vm=NAME checkpoint=NAME
    disk=ID           one export per disk (repeatable); the first is the default export
    keyfd=N           encrypted repositories: an inherited pipe holding the key nbdbackup
                      opened (serving.key_pipe); read once, here, and closed
"""

import errno
import os
import site
import sys

import nbdkit

API_VERSION = 2

_params: dict = {"disk": []}
_images: dict = {}
_lock_holder: list = []


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def use_path(ours):
    """sys.path = nbdbackup's own sys.path (ours), in its order, AHEAD of the embedded Python's:
    the system's dist-packages may hold older versions of the same packages (cryptography, for
    one), and an entry both have (PYTHONPATH, which nbdkit inherits) must not fall behind an
    installed nbdbackup, or this file would import another nbdbackup than its own.  The .pth
    files of ours' directories run (an editable install may import there); what they add
    that ours lacks goes right behind ours."""
    before = list(sys.path)
    ours = list(dict.fromkeys(p for p in ours if p))
    for p in ours:
        site.addsitedir(p)
    added = [p for p in sys.path if p not in ours and p not in before]
    sys.path[:] = ours + added + [p for p in before if p not in ours]


def config(key, value):
    if key == "path":
        use_path(value.split(os.pathsep))
    elif key == "disk":
        _params["disk"].append(value)
    elif key == "keyfd":
        from nbdbackup.serving import read_key

        _params["key"] = read_key(int(value))
    elif key in ("repo", "config", "vm", "checkpoint"):
        _params[key] = value
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    for key in ("repo", "vm", "checkpoint"):
        if key not in _params:
            raise RuntimeError(f"parameter {key}= is missing")
    if not _params["disk"]:
        raise RuntimeError("no disk= given")


def get_ready():
    """Open the repository and every index before the socket accepts anyone."""
    from nbdbackup.engine import open_backup

    repo, lock, images = open_backup(_params["repo"], _params.get("config") or None, _params["vm"],
                                     _params["checkpoint"], _params["disk"], _params.pop("key", None))
    _lock_holder.append(lock)  # the shared repository lock: no garbage collection while we serve
    _images.update(images)


def cleanup():
    """nbdkit exits normally (under nbdfuse: at umount): stop reading ahead, release the lock."""
    for image in _images.values():
        image.close()
    while _lock_holder:
        _lock_holder.pop().__exit__(None, None, None)


def list_exports(readonly, is_tls):
    return list(_params["disk"])


def default_export(readonly, is_tls):
    return _params["disk"][0]


def open(readonly):
    name = nbdkit.export_name() or _params["disk"][0]
    image = _images.get(name)
    if image is None:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no disk {name!r} in this backup")
    return image


def get_size(h):
    return h.size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_EMULATE


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    try:
        h.read_into(buf, offset)
    except Exception as exc:
        nbdkit.set_error(errno.EIO)
        nbdkit.debug(f"nbdbackup: read failed: {exc}")
        raise


def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    runs = [(start, length, 0 if data else hole) for start, length, data in h.extents(offset, count)]
    return runs[:1] if flags & nbdkit.FLAG_REQ_ONE else runs
