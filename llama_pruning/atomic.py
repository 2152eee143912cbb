"""Atomic writes: every file or folder appears under its final name complete, or not at all.

Writers work on a temporary sibling named `.<name>.tmp-<pid>-<random>` and rename it into place when it is
complete; a failure removes it. A temporary left by a killed process (its pid is gone) is removed by the
next writer into the same folder (`remove_stale`). Finished files get mode 0644 and folders 0755 (minus
the umask), as `open` and `mkdir` would give, not the 0600/0700 of `tempfile`. Only a folder writer replaces
an existing folder (a run written again with --overwrite); a file writer refuses a folder at its target.

    with atomic_path(target) as tmp:        # tmp: a path to write (a file, or a fresh folder with directory=True)
        write_something(tmp)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PAUSE_ENV = "LLAMA_PRUNING_TEST_PAUSE_AT_FILES"  # tests only: a writer stops once its temp folder holds N files
_TEMP = ".tmp-"
_OLD = ".old-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_modes(path: Path) -> None:
    """Files 0644 and folders 0755 (minus the umask), recursively: what plain `open`/`mkdir` would give."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def temp_sibling(target: str | Path, directory: bool = False) -> Path:
    """Create (empty) and return a temporary sibling of `target`, removable by `remove_stale` once we are gone."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{_TEMP}{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_file_target(target: str | Path) -> None:
    """Raise IsADirectoryError (one line) when `target`, where a file is to be written, is a folder: replacing it would
    delete the folder and everything in it."""
    if Path(target).is_dir():
        raise IsADirectoryError(f"{target} is a folder; a file path is expected (nothing was written)")


def replace(src: Path, target: Path) -> None:
    """Move the finished `src` onto `target`. A finished folder swaps out an existing folder there, which is then
    deleted; a finished file never replaces a folder (`check_file_target`)."""
    if not src.is_dir():
        check_file_target(target)
    fix_modes(src)
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(src, target)
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}-{time.time_ns()}"
    os.replace(target, old)
    os.replace(src, target)  # a crash between the two renames leaves `old`, which remove_stale puts back
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (a fresh folder with `directory`); rename it onto `target` on success.
    A file writer (no `directory`) whose `target` is a folder is refused before it writes anything."""
    target = Path(target)
    if not directory:
        check_file_target(target)
    tmp = temp_sibling(target, directory)
    try:
        yield tmp
        replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(folder: str | Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Clean temporaries in `folder` whose writer has died; a swapped-out folder whose swap never finished is
    put back under its name. Returns the paths removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for path in sorted(folder.iterdir()):
        name = path.name
        kind = _TEMP if _TEMP in name else _OLD if _OLD in name else None
        if not name.startswith(".") or kind is None:
            continue
        base, _, rest = name[1:].rpartition(kind)
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        original = folder / base
        if kind == _OLD and not original.exists():
            os.replace(path, original)
            message = f"restored {original} from an interrupted swap ({name})"
        else:
            _remove(path)
            message = f"removed {path}, left behind by an interrupted run (pid {pid})"
        if log is not None:
            log(message)
        done.append(path)
    return done


def pause_point(folder: Path) -> None:
    """Tests only: with LLAMA_PRUNING_TEST_PAUSE_AT_FILES=N, stop here for good once `folder` holds N files,
    so a test can kill the writer at a known moment."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    count = sum(len(files) for _, _, files in os.walk(folder))
    if count >= int(wanted):
        print(f"paused with {count} files in {folder}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
