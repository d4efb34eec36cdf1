"""The course cache: derived assets built once, atomically, and checked every time they are used.

``cached_build(name, build, version)`` returns ``<cache>/<name>-v<version>``, building it first if it
is missing: ``build(folder)`` writes into a temporary folder, a
manifest of every file's size and sha256 is written beside the completion marker, and the folder is
renamed into place, so an interrupted build never leaves a half-written asset behind.  A cached
asset is checked on every use (sizes and file times; every sha256 with ``RLHF_COURSE_VERIFY_ASSETS=1``
or ``verify_asset``); a damaged one raises an ``AssetError`` that names the file and how to rebuild it.
A folder without the marker is moved aside, never deleted; temporary folders of dead builds are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

CACHE_ENV = "RLHF_COURSE_CACHE"
COMPLETE_MARKER = ".rlhf_course_complete"
MANIFEST = ".rlhf_course_manifest.json"  # size and sha256 of every file of a built asset
VERIFY_ENV = "RLHF_COURSE_VERIFY_ASSETS"  # 1: check every sha256 whenever a cached asset is used
STALE_TEMP_SECONDS = 6 * 3600  # age after which another machine's (or an older release's) temp folder is removed
# Whether ``assets.rebuild(name)`` can rebuild an asset: core.assets points it at its registry at import.
REBUILDABLE: Callable[[str], bool] = lambda name: False  # noqa: E731



class AssetError(RuntimeError):
    """An asset could not be found or built; the message says what to do."""



def cache_dir() -> Path:
    """Where derived assets live: ``RLHF_COURSE_CACHE`` or the user's cache folder."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "rlhf_course")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_build(name: str, build: Callable[[Path], None], version: str = "1", *,
                 verify: bool | None = None) -> Path:
    """Return the cache folder for ``name``, building it first if it is absent.

    The folder is ``<cache>/<name>-v<version>``.  ``build(folder)`` writes into a fresh temporary
    folder (``.tmp-<name>-v<version>-h<host>-p<pid>-<random>``) on the caller's torch threads;
    only when it returns are the checksum list
    (``MANIFEST``: size and sha256 of every file) and the completion marker written and the folder
    renamed into place (an atomic rename on one file system).

    An existing complete folder is checked before it is returned: every file's size always, and
    its sha256 when the file's status changed since the build (an edit in place), when ``verify``
    is true, or, with ``verify=None``, when ``RLHF_COURSE_VERIFY_ASSETS=1``.  A damaged folder
    raises ``AssetError`` naming the asset, the folder, the file and how to rebuild it.  A complete
    folder built before checksums were kept gets its list recorded on first use (once, a second
    or two for the 517 MB SmolLM2 checkpoint; a read-only folder is accepted as it is).

    A folder without the completion marker (an unfinished or hand-made copy) is never deleted: it
    is renamed to ``<name>-v<version>.incomplete-<time>`` with a printed note, and the asset is
    built again.  Temporary folders of this asset left by interrupted builds (their process has
    died, or, for another machine's or an older release's, they are over ``STALE_TEMP_SECONDS``
    old) are removed whenever the asset is built or loaded.
    """
    version = str(version)
    final = asset_folder(name, version)
    _remove_stale_temps(name, version)
    if _REBUILDING.get(name) is False:  # assets.rebuild(name): the existing copy goes first
        _REBUILDING[name] = True
        _discard(final, name)
    if (final / COMPLETE_MARKER).exists():
        check_folder(final, name, version, full=_verify_requested(verify))
        return final
    if final.exists() or final.is_symlink():
        _move_aside(final, name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(name, version), dir=final.parent))
    try:
        build(tmp)  # on the caller's torch threads: every core (figures are checked by range, not bits)
        _write_manifest(tmp, name, version)
        (tmp / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / COMPLETE_MARKER).exists():
                raise
            check_folder(final, name, version, full=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- cache integrity


def check_asset_name(name: str, what: str = "asset name") -> str:
    """``name`` if it can name a folder inside the cache, else a ``ValueError`` saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"The {what} must be a non-empty string, not {name!r}.")
    separators = {"/", "\\", "\0", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in separators) or ".." in name or name.startswith("."):
        raise ValueError(
            f"The {what} {name!r} is not allowed: it becomes a folder name inside the course cache, "
            "so it may not contain a path separator ('/' or '\\'), '..' or a NUL character, nor "
            "start with '.' (the cache's own temporary folders do)."
        )
    return name


def asset_folder(name: str, version: str = "1") -> Path:
    """The cache folder of ``name`` at ``version`` (built or not): ``<cache>/<name>-v<version>``."""
    check_asset_name(name)
    check_asset_name(str(version), "asset version")
    return cache_dir() / f"{name}-v{version}"


def verify_asset(name: str | os.PathLike, version: str | None = None) -> list[Path]:
    """Check every file of a built asset against its sha256 list; return the folders checked.

    ``name`` is an asset name (every built version is checked unless ``version`` is given) or a
    cache folder.  Raises ``AssetError`` (what differs, and how to rebuild) when a copy is damaged,
    when it has no checksum list to check against, or when nothing is built.  A loader can call it
    after a load error (``explain_load_errors`` does): a damaged file then gets a clear message.
    """
    if isinstance(name, os.PathLike):
        folder = Path(name)
        manifest = _read_manifest(folder) if (folder / MANIFEST).exists() else {}
        asset = str(manifest.get("asset") or folder.name.rsplit("-v", 1)[0])
        folders = [(folder, asset, str(manifest.get("version") or folder.name.rsplit("-v", 1)[-1]))]
    else:
        check_asset_name(name)
        if version is not None:
            folders = [(asset_folder(name, version), name, str(version))]
        else:
            prefix = f"{name}-v"
            folders = [
                (p, name, p.name[len(prefix):]) for p in sorted(cache_dir().iterdir())
                if p.name.startswith(prefix) and (p / COMPLETE_MARKER).exists()
                and _read_manifest_or_none(p, {}).get("asset", name) == name
            ]
        if not folders:
            raise AssetError(f"No built copy of '{name}' in {cache_dir()}: nothing to verify "
                             "(a derived asset is built on first use).")
    for folder, asset, asset_version in folders:
        if not (folder / COMPLETE_MARKER).exists():
            raise _damaged(asset, asset_version, folder,
                           f"the folder is missing or unfinished (no {COMPLETE_MARKER} marker)")
        if not (folder / MANIFEST).exists():
            raise _damaged(asset, asset_version, folder,
                           f"it has no checksum list ({MANIFEST}; it was built before checksums were "
                           "kept and its folder could not be written), so it cannot be checked; if "
                           "loading it fails, rebuild it")
        check_folder(folder, asset, asset_version, full=True)
    return [folder for folder, _, _ in folders]


@contextlib.contextmanager
def explain_load_errors(folder: str | os.PathLike):
    """Wrap a load from a cache folder: if it fails, check the folder's checksums, and raise an
    ``AssetError`` naming the damaged file and how to rebuild (from the original error) if one
    differs; otherwise the original error propagates unchanged."""
    try:
        yield
    except AssetError:
        raise
    except Exception as error:
        folder = Path(folder)
        if (folder / COMPLETE_MARKER).exists():
            try:
                verify_asset(folder)
            except AssetError as damaged:
                raise damaged from error
        raise


def check_folder(folder: Path, name: str, version: str, full: bool = False) -> None:
    """Compare a complete cache folder with its checksum list; raise ``AssetError`` if it differs.

    Sizes are always compared; sha256 when ``full``, or for a file whose modification or status
    change time is not the one recorded (the list is then updated, so the next check is cheap).
    A folder without a list (built before checksums were kept) gets one recorded now.
    """
    if not (folder / MANIFEST).exists():
        _adopt(folder, name, version)
        return
    manifest = _read_manifest(folder, name, version)
    to_hash, stats = [], {}
    for relative, entry in sorted(manifest["files"].items()):
        path = folder / relative
        try:
            stat = path.stat()
        except OSError:
            raise _damaged(name, version, folder, f"{relative} is missing") from None
        if stat.st_size != entry.get("size"):
            raise _damaged(name, version, folder,
                           f"{relative} has {stat.st_size:,} bytes where {entry.get('size'):,} were "
                           "written (a truncated or replaced file)")
        stats[relative] = stat
        moved = (stat.st_mtime_ns, stat.st_ctime_ns) != (entry.get("mtime_ns"), entry.get("ctime_ns"))
        if full or moved:
            to_hash.append((relative, path, stat, moved))
    changed = False
    for relative, path, stat, moved in to_hash:
        expected = manifest["files"][relative].get("sha256")
        found = _sha256_once(path, stat)
        if found != expected:
            raise _damaged(name, version, folder,
                           f"{relative} differs from the file that was built (sha256 {found[:16]}..., "
                           f"{str(expected)[:16]}... recorded): it was overwritten or corrupted")
        if moved:
            manifest["files"][relative].update(mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns)
            changed = True
    if changed:  # same bytes, new times (a copy, a touch): record them so the next check is cheap
        with contextlib.suppress(OSError):
            _write_json_atomic(folder / MANIFEST, manifest)


_REBUILDING: dict[str, bool] = {}  # assets.rebuild in progress: name -> existing copy discarded yet
_HASHED: dict[str, tuple] = {}  # file -> (stat key, sha256) of its last hash in this process


def _verify_requested(verify: bool | None) -> bool:
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "").strip() not in ("", "0")


def _stat_key(stat) -> tuple:
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def _sha256_once(path: Path, stat) -> str:
    """The file's sha256, hashed again only if its status changed since this process last read it."""
    key = _stat_key(stat)
    known = _HASHED.get(str(path))
    if known is not None and known[0] == key:
        return known[1]
    digest = _sha256(path)
    _HASHED[str(path)] = (key, digest)
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file of a built folder except the cache's own bookkeeping files."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for file_name in sorted(names):
            path = Path(root) / file_name
            relative = path.relative_to(folder).as_posix()
            if relative in (MANIFEST, COMPLETE_MARKER) or relative.startswith(MANIFEST + ".tmp-"):
                continue
            if path.is_file():
                files.append((relative, path))
    return files


def _manifest(folder: Path, name: str, version: str, note: str | None = None) -> dict:
    files = {}
    for relative, path in _payload_files(folder):
        stat = path.stat()
        files[relative] = {"size": stat.st_size, "sha256": _sha256_once(path, stat),
                           "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    manifest = {"format": 1, "asset": name, "version": version,
                "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}
    if note:
        manifest["note"] = note
    return manifest


def _write_manifest(folder: Path, name: str, version: str, note: str | None = None) -> None:
    _write_json_atomic(folder / MANIFEST, _manifest(folder, name, version, note))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_manifest(folder: Path, name: str | None = None, version: str | None = None) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        if not all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                   and isinstance(entry.get("sha256"), str) for entry in manifest["files"].values()):
            raise ValueError("a malformed entry")
        return manifest
    except (OSError, ValueError) as error:
        raise _damaged(name or folder.name, version or "?", folder,
                       f"its checksum list {MANIFEST} is unreadable ({error})") from None


def _read_manifest_or_none(folder: Path, default):
    try:
        return _read_manifest(folder) if (folder / MANIFEST).exists() else default
    except AssetError:
        return default


def _adopt(folder: Path, name: str, version: str) -> None:
    """Record the checksum list of a complete folder built before lists were kept (or accept it
    as it is when the folder cannot be written)."""
    try:
        manifest = _manifest(folder, name, version,
                             note="recorded on first use after the build (built before checksums were kept)")
        _write_json_atomic(folder / MANIFEST, manifest)
    except OSError:
        return
    print(f"Recorded the checksums of the cached '{name}' ({folder}), built before checksums were kept.",
          file=sys.stderr, flush=True)


def _damaged(name: str, version: str, folder: Path, problem: str) -> AssetError:
    if REBUILDABLE(name):
        how = (
            "Rebuild it with\n"
            f"    python -c \"from rlhf_course.core import assets; assets.rebuild('{name}')\"\n"
            "(it deletes the damaged copy and builds the asset again), or delete the folder\n"
            f"    rm -r '{folder}'\n"
            "and load the asset again: it is rebuilt on first use."
        )
    else:
        how = (
            "Delete the folder\n"
            f"    rm -r '{folder}'\n"
            "and run the code that built it again (the notebook cell or command): it is rebuilt on "
            "first use."
        )
    return AssetError(f"The cached asset '{name}' (version {version}) is damaged: {problem}.\n"
                      f"Folder: {folder}\n{how}")


def _host_tag() -> str:
    """Eight hex digits naming this machine, boot and process namespace (temporary-folder names)."""
    parts = [platform.node()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return f"{zlib.crc32('|'.join(parts).encode()):08x}"


def _temp_prefix(name: str, version: str, pid: int | None = None) -> str:
    return f".tmp-{name}-v{version}-h{_host_tag()}-p{os.getpid() if pid is None else pid}-"


def _temp_pattern(name: str, version: str) -> re.Pattern:
    # today's names carry the host tag and pid; older releases wrote .tmp-<name>-v<version>-<random>
    return re.compile(rf"\.tmp-{re.escape(name)}-v{re.escape(version)}-"
                      r"(?:h(?P<host>[0-9a-f]{8})-p(?P<pid>\d+)-)?[a-z0-9_]{8}")


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe liveness probe: os.kill would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _is_stale(match: re.Match, folder: Path) -> bool:
    if match["pid"] and match["host"] == _host_tag():
        pid = int(match["pid"])
        return pid != os.getpid() and not _process_alive(pid)
    try:  # another machine's, or an older release's: no process to ask, so go by age
        return time.time() - folder.stat().st_mtime > STALE_TEMP_SECONDS
    except OSError:
        return False


def _remove_stale_temps(name: str, version: str) -> None:
    """Delete the temporary folders of this asset left by builds whose process died."""
    pattern = _temp_pattern(name, version)
    try:
        entries = list(cache_dir().iterdir())
    except OSError:
        return
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and _is_stale(match, entry):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry.name)
    if removed:
        print(f"Removed {len(removed)} temporary folder(s) of '{name}' left by interrupted builds: "
              f"{', '.join(removed)} (in {cache_dir()}).", file=sys.stderr, flush=True)


def _move_aside(final: Path, name: str) -> None:
    """Rename a folder that lacks the completion marker out of the way (never delete it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = final.with_name(f"{final.name}.incomplete-{stamp}")
    count = 1
    while target.exists() or target.is_symlink():
        target = final.with_name(f"{final.name}.incomplete-{stamp}-{count}")
        count += 1
    try:
        final.rename(target)
    except FileNotFoundError:  # another process moved it first
        return
    print(f"The cache folder {final} has no completion marker ({COMPLETE_MARKER}): it is an unfinished "
          f"build or a hand-made copy, so it was not used. Moved it aside to {target} (nothing was "
          f"deleted; delete that folder when you no longer need it) and building '{name}' again.",
          file=sys.stderr, flush=True)


def _discard(final: Path, name: str) -> None:
    """Delete a cached copy (``rebuild``): renamed to a temporary name first, so a crash while
    deleting leaves a folder that the next build cleans up, never a half-deleted asset."""
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_symlink():
        final.unlink()
        return
    version = final.name[len(name) + 2:]
    trash = final.with_name(_temp_prefix(name, version) + secrets.token_hex(4))
    final.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    print(f"Deleted the cached '{name}' ({final}); building it again.", file=sys.stderr, flush=True)


