"""Safe file writes: atomic replacement, names and paths that stay inside their folder, an
exclusive lock on a training's output folder, and clean-up after interrupted saves.

An atomic write goes to a temp file in the same folder, is fsynced, then renamed over the
target: a crash or a full disk leaves the old file in place, never a half-written one. The
temp file's name carries the writer's pid (`.NAME.PID-XXXXXX.tmp`), so a later run removes
the leftovers of a killed process and never the file another live process is writing.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from sdlora.errors import UserError

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-[^.]+(\.tmp|\.old)?$")
LOCK_FILE = ".sdlora-train.lock"

# Files the dataset reads as images (and never writes a caption over).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _plain_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _name_the_target(e: OSError, path: Path) -> OSError:
    """The same error naming `path` rather than the temp file (the user never sees temp names)."""
    return type(e)(e.errno, e.strerror, str(path)) if e.errno else e


# safetensors' Rust writer reports a failed write as its own SafetensorError, not OSError, with the
# system's error number only in the text: "I/O error: No space left on device (os error 28)"
# (older releases: "IoError(Os { code: 28, kind: StorageFull, ... })").
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_error_of(e: BaseException, path: str | Path | None = None) -> OSError | None:
    """`e` as an OSError naming `path` when it is one, or a library's wrapper of one (safetensors');
    None for anything else."""
    if isinstance(e, OSError):
        return e
    m = _OS_ERROR_NUMBER.search(str(e)) if type(e).__name__ == "SafetensorError" else None
    if m is None:
        return None
    number = int(m[1] or m[2])
    return OSError(number, os.strerror(number), None if path is None else str(path))


def os_error_message(e: OSError) -> str:
    """One line for a failed read or write: the file, what the system said, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    fixes = {
        errno.ENOSPC: "the disk is full: free some space (or set output.dir on another disk) and run again; "
                      "files written before stay whole",
        errno.EDQUOT: "the disk quota is used up: free some space and run again; files written before stay whole",
        errno.EFBIG: "the file is larger than this system allows (a file-size limit such as `ulimit -f`, or the "
                     "file system's maximum): raise the limit or set output.dir on another disk; files written "
                     "before stay whole",
        errno.EACCES: "permission denied: make the folder writable for you, or choose another path",
        errno.EPERM: "operation not permitted: check the file's owner and permissions, or choose another path",
        errno.EROFS: "the file system is read-only: choose a writable path (e.g. set output.dir)",
        errno.ENOENT: "no such file or folder: check the path",
        errno.EISDIR: "this is a folder, not a file: give a file path",
        errno.ENOTDIR: "a part of this path is a file, not a folder: check the path",
    }
    return where + fixes.get(e.errno, f"{e.strerror or e}: check the path and the disk")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    The file ends with the mode a plain write would give (0666 & ~umask), also when the writer
    re-creates the temp file (safetensors does, with 0600).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _name_the_target(e, path) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _plain_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = os_error_of(e)
        if failed is not None and failed.filename in (None, tmp):  # write() and fsync() name no file
            raise _name_the_target(failed, path) from None
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | Path):
    """Yield a temporary folder next to `folder`; on success it replaces `folder` (the old one is removed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*"):  # left by a killed save of this folder
        m = _TEMP.match(stale.name)
        if m and stale.is_dir() and not pid_alive(int(m["pid"])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(folder), dir=folder.parent))
    os.chmod(tmp, _plain_mode(directory=True))
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(folder), suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = os_error_of(e)
        if failed is not None and (failed.filename is None or str(tmp) in str(failed.filename)):
            raise _name_the_target(failed, folder) from None  # a file inside the temp folder: name the folder
        raise


def refuse_to_overwrite(path: str | Path, overwrite: bool, replace: str = "pass --overwrite", why: str = "",
                        rename: str = "choose another output name") -> None:
    """The one refusal for an output that exists: it names the file (and `why` it is not reused),
    and both ways out: `rename`, or `replace`."""
    if not overwrite and Path(path).exists():
        raise UserError(f"{path} already exists{why}; {rename}, or {replace} to replace it")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (the output lock's stale check; the UI's training status)."""
    if os.name == "nt":  # os.kill(pid, 0) terminates the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: str | Path, log=print) -> list[Path]:
    """Delete the temp files and folders of atomic writes whose writer no longer runs (killed
    mid-save), anywhere under `folder`; return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            m = _TEMP.match(name)
            if not m or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
                continue
            path = Path(root) / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                with contextlib.suppress(OSError):  # a folder made read-only since: leave it
                    path.unlink(missing_ok=True)
            if not path.exists():
                removed.append(path)
    if removed:
        log(f"removed {len(removed)} temp file(s) left by an interrupted save in {folder}")
    return removed


def read_caption(path: str | Path, log=print) -> str:
    """A caption file's text: UTF-8 (a BOM is dropped); anything else is read as Windows-1252
    (Latin-1 where that fails), and the log says so and names the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        text, encoding = data.decode("latin-1"), "Latin-1"
    log(f"warning: {path} is not UTF-8 text; read it as {encoding}. Save it as UTF-8 if any tag looks wrong")
    return text


# ---------------------------------------------------------------------------------------------
# Names and paths

_UNSAFE = re.compile(r'[\x00-\x1f<>:"/\\|?*]')


def file_name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name on every OS sdlora runs on, or None when it can."""
    if not name.strip():
        return "it is empty"
    if name in (".", "..") or name.startswith("."):
        return "it starts with '.' (a hidden file, or a path step)"
    bad = sorted(set(_UNSAFE.findall(name)))
    if bad:
        return f"it contains {' '.join(repr(c) for c in bad)} (path separators or characters file systems refuse)"
    if name != name.strip() or name.endswith("."):
        return "it starts or ends with a space or ends with '.'"
    return None


def safe_file_stem(name: str, fallback: str = "lora") -> str:
    """`name` (e.g. an adapter's ss_output_name, read from a file someone else made) made into one
    file name in the current folder: path separators and refused characters become '_'."""
    stem = _UNSAFE.sub("_", name).strip().lstrip(".").rstrip(". ")
    return stem or fallback


def inside(folder: str | Path, path: str | Path, what: str = "output file") -> Path:
    """`path` when it lies inside `folder` (after resolving '..' and links), else a UserError."""
    folder, path = Path(folder), Path(path)
    resolved, root = path.resolve(), folder.resolve()
    if resolved != root and root not in resolved.parents:
        raise UserError(f"{what} {path} would be written outside {folder}; use a plain file name")
    return path


# ---------------------------------------------------------------------------------------------
# The output folder's lock


@contextlib.contextmanager
def output_lock(folder: str | Path, log=print):
    """Hold an exclusive lock on a training's output folder, or stop with the holder's pid.

    An OS lock (flock) on `<folder>/.sdlora-train.lock`: the kernel releases it when its holder
    exits, however it exits, so the lock of a killed run is recovered by the next one. Where
    flock does not exist (Windows), the folder is not locked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield None
        return
    path = folder / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(f"{folder} is in use by another sdlora training (pid {holder}); wait for it to finish, "
                            f"stop it, or set another output.dir") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log(f"recovered the lock of an earlier training (pid {previous}) that did not finish in {folder}")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
        f.seek(0)
        f.truncate()
        f.flush()
    finally:
        f.close()
