"""Release operations that run on the board: probe and verify, finish uploads, assemble, activate, roll back.

The deploy stage (``stages/board_release.py``) sends this file to the board's
Python on stdin and names one operation and its JSON arguments on the command
line::

    <board python> - probe '{"remote_dir": "/home/HwHiAiUser/silu", "objects": {...}}'

Each operation prints one JSON object on stdout; on failure it prints a
traceback on stderr and exits 1. It runs on the board's Python 3.9 and uses
only the standard library.

Layout under ``remote_dir``::

    objects/<sha256>         uploaded files, named by content; <sha256>.part while uploading
    releases/<name>/         one folder per release, its files hard links into objects/
    releases/<name>/release.json   the release's manifest (path -> sha256, size)
    current -> releases/<name>     the release the board runs
    previous -> releases/<name>    the release before it; `rollback` switches back to it

Hard links make an unchanged file cost neither upload nor disk space in a new
release. An object whose link count drops to 1 belongs to no release and is
deleted by ``activate``. ``current`` and ``previous`` are switched by creating
a new symlink beside them and renaming it over the old one (``rename(2)``,
like ``ln -sfn NEW .tmp && mv -T .tmp current``), so a reader sees the old
release or the new one, never a missing or half-written link. ``assemble``
builds a release without switching, so the deploy stage can test-run it
before ``activate`` makes it current. A ``.lock`` file (``flock``) keeps two
assembles, activations or rollbacks from interleaving.

Limits: needs a filesystem with hard links and symlinks (ext4 on the
OrangePi image). Uploads themselves are not locked: two hosts uploading the
same object at once corrupt its ``.part``, which ``finish`` then detects by
hash and deletes.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time

HASH_CHUNK = 1 << 20
RELEASE_MANIFEST = "release.json"


# --------------------------------------------------------------------------- helpers


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_sha(sha):
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError("invalid sha256 %r" % (sha,))
    return sha


def _check_relpath(path):
    """Reject absolute paths, `..` and empty parts, so a manifest cannot write outside its release."""
    parts = path.split("/")
    if path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in path:
        raise ValueError("invalid release path %r" % (path,))
    return path


def _check_name(name):
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError("invalid release name %r" % (name,))
    return name


def _link_target(root, link):
    """Return the release name a `current`/`previous` link points to, or None."""
    path = os.path.join(root, link)
    if not os.path.islink(path):
        return None
    target = os.readlink(path)
    name = os.path.basename(target.rstrip("/"))
    if not os.path.isdir(os.path.join(root, "releases", name)):
        return None
    return name


def _switch(root, link, name):
    """Point ``root/link`` at ``releases/name`` atomically: new symlink beside it, renamed over it."""
    tmp = os.path.join(root, ".%s.tmp" % link)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("releases", name), tmp)
    os.replace(tmp, os.path.join(root, link))
    _fsync_dir(root)


def _releases(root):
    folder = os.path.join(root, "releases")
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@contextlib.contextmanager
def _locked(root):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _dist_version(*names):
    """Return the installed version of the first distribution found among ``names``, or None."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return None
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _free_bytes(path):
    """Return free bytes for an unprivileged user on the filesystem of ``path`` (or of its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize, probe


def _writable(path):
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return os.access(probe, os.W_OK | os.X_OK)


# --------------------------------------------------------------------------- operations


def probe(args):
    """Report the board's Python, MindSpore/MindNLP versions, tools, free space and stored objects.

    With ``"verify": true`` it also hashes every stored object named in
    ``objects`` and deletes those whose content no longer matches their name
    (reported as ``corrupt``), but only when MindSpore and MindNLP are
    installed and ``remote_dir`` is writable: a board that fails those checks
    gets its error before minutes of hashing.
    """
    root = os.path.abspath(args["remote_dir"])
    free, free_path = _free_bytes(root)
    result = {
        "remote_dir": root,
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "mindspore": _dist_version("mindspore", "mindspore-dev"),
        "mindnlp": _dist_version("mindnlp"),
        "tools": {name: shutil.which(name) for name in ("timeout", "pkill")},
        "free_bytes": free,
        "free_path": free_path,
        "writable": _writable(root),
        "current": _link_target(root, "current"),
        "previous": _link_target(root, "previous"),
        "releases": _releases(root),
    }
    verify = bool(args.get("verify") and result["mindspore"] and result["mindnlp"] and result["writable"])
    objects = {}
    for sha, size in sorted(args.get("objects", {}).items()):
        path = os.path.join(root, "objects", _check_sha(sha))
        if os.path.isfile(path):
            if verify and (os.path.getsize(path) != size or _sha256(path) != sha):
                os.unlink(path)
                objects[sha] = {"state": "corrupt", "size": 0}
            else:
                objects[sha] = {"state": "complete", "size": os.path.getsize(path)}
        elif os.path.isfile(path + ".part"):
            objects[sha] = {"state": "partial", "size": os.path.getsize(path + ".part")}
        else:
            objects[sha] = {"state": "missing", "size": 0}
    result["objects"] = objects
    result["verified"] = verify
    return result


def finish(args):
    """Hash each uploaded ``.part``; rename a matching one to its object name, delete one that does not match."""
    root = os.path.abspath(args["remote_dir"])
    folder = os.path.join(root, "objects")
    result = {"ok": [], "mismatch": {}}
    for sha, size in sorted(args["objects"].items()):
        part = os.path.join(folder, _check_sha(sha) + ".part")
        actual_size = os.path.getsize(part)
        actual = _sha256(part) if actual_size == size else None
        if actual != sha:
            os.unlink(part)
            result["mismatch"][sha] = {"size": actual_size, "sha256": actual}
            continue
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part, os.path.join(folder, sha))
        result["ok"].append(sha)
    if result["ok"]:
        _fsync_dir(folder)
    return result


def _fill_release(release_dir, objects, files):
    """Make ``release_dir`` hold exactly ``files`` as hard links into ``objects``; return paths repaired."""
    repaired = []
    wanted = set()
    for rel, sha in sorted(files.items()):
        target = os.path.join(release_dir, _check_relpath(rel))
        source = os.path.join(objects, _check_sha(sha))
        wanted.add(os.path.normpath(target))
        if os.path.isfile(target) and os.path.samefile(target, source):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".link-tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(source, tmp)
        # Replacing file by file keeps a live release readable while it is repaired.
        os.replace(tmp, target)
        repaired.append(rel)
    manifest = os.path.normpath(os.path.join(release_dir, RELEASE_MANIFEST))
    for folder, _, names in os.walk(release_dir):
        for name in names:
            path = os.path.normpath(os.path.join(folder, name))
            if path not in wanted and path != manifest:
                os.unlink(path)
                repaired.append(os.path.relpath(path, release_dir))
    return repaired


def _prune(root, keep):
    """Delete releases beyond ``keep`` besides `current` (`previous` first, then newest), then orphans."""
    current = _link_target(root, "current")
    previous = _link_target(root, "previous")
    folder = os.path.join(root, "releases")
    others = [name for name in _releases(root) if name != current]
    others.sort(key=lambda name: (name != previous, -os.path.getmtime(os.path.join(folder, name))))
    pruned = others[keep:]
    for name in pruned:
        shutil.rmtree(os.path.join(folder, name))
    if previous in pruned:
        os.unlink(os.path.join(root, "previous"))
    for name in os.listdir(folder):
        if name.startswith("."):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    removed_objects = 0
    objects = os.path.join(root, "objects")
    for name in os.listdir(objects) if os.path.isdir(objects) else []:
        path = os.path.join(objects, name)
        # A link count of 1 means that no release links the object any more. A leftover
        # .part belongs to an abandoned upload, because activate runs after all uploads.
        if name.endswith(".part") or os.stat(path).st_nlink == 1:
            os.unlink(path)
            removed_objects += 1
    return pruned, removed_objects


def assemble(args):
    """Build (or repair) ``releases/<release>`` from hard links into ``objects/``; `current` does not move."""
    root = os.path.abspath(args["remote_dir"])
    name = _check_name(args["release"])
    files = args["files"]
    objects = os.path.join(root, "objects")
    missing = [rel for rel, sha in files.items() if not os.path.isfile(os.path.join(objects, _check_sha(sha)))]
    if missing:
        raise RuntimeError("objects missing for %s; upload them first" % ", ".join(sorted(missing)[:5]))

    with _locked(root):
        folder = os.path.join(root, "releases")
        os.makedirs(folder, exist_ok=True)
        release_dir = os.path.join(folder, name)
        if os.path.isdir(release_dir):
            repaired = _fill_release(release_dir, objects, files)
        else:
            staging = os.path.join(folder, ".%s.tmp" % name)
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            _fill_release(staging, objects, files)
            os.rename(staging, release_dir)
            repaired = []
        manifest = {"release": name, "files": files, "assembled": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = os.path.join(release_dir, "." + RELEASE_MANIFEST + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(release_dir, RELEASE_MANIFEST))
        _fsync_dir(release_dir)
        _fsync_dir(folder)
    return {"release_dir": release_dir, "repaired": repaired, "current": _link_target(root, "current")}


def activate(args):
    """Switch `previous` to the old `current` and `current` to ``release``; then prune old releases."""
    root = os.path.abspath(args["remote_dir"])
    name = _check_name(args["release"])
    with _locked(root):
        if not os.path.isfile(os.path.join(root, "releases", name, RELEASE_MANIFEST)):
            raise RuntimeError("release %s is not assembled under %s" % (name, root))
        old = _link_target(root, "current")
        if old != name:
            if old is not None:
                _switch(root, "previous", old)
            _switch(root, "current", name)
        # The newest release to become current sorts first when pruning.
        os.utime(os.path.join(root, "releases", name), None)
        pruned, removed_objects = _prune(root, int(args["keep"]))
    return {
        "current": _link_target(root, "current"),
        "previous": _link_target(root, "previous"),
        "switched": old != name,
        "pruned": pruned,
        "removed_objects": removed_objects,
    }


def rollback(args):
    """Switch `current` back to `previous`, and `previous` to the release that was current."""
    root = os.path.abspath(args["remote_dir"])
    with _locked(root):
        current = _link_target(root, "current")
        previous = _link_target(root, "previous")
        if previous is None:
            raise RuntimeError(
                "no previous release under %s to roll back to (releases: %s)"
                % (root, ", ".join(_releases(root)) or "none")
            )
        _switch(root, "current", previous)
        if current is not None:
            _switch(root, "previous", current)
            os.utime(os.path.join(root, "releases", current), None)
        os.utime(os.path.join(root, "releases", previous), None)
    return {"current": previous, "previous": current}


def status(args):
    """Report `current`, `previous` and the stored releases."""
    root = os.path.abspath(args["remote_dir"])
    return {
        "remote_dir": root,
        "current": _link_target(root, "current"),
        "previous": _link_target(root, "previous"),
        "releases": _releases(root),
    }


OPERATIONS = {
    "probe": probe,
    "finish": finish,
    "assemble": assemble,
    "activate": activate,
    "rollback": rollback,
    "status": status,
}


def main(argv):
    if len(argv) != 2 or argv[0] not in OPERATIONS:
        sys.stderr.write("usage: python - {%s} JSON\n" % ",".join(sorted(OPERATIONS)))
        return 2
    result = OPERATIONS[argv[0]](json.loads(argv[1]))
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
