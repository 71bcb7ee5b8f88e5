# Copyright 2026 The transformers-mhc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Writing an output folder without ever losing what is on disk.

`OutputFolder` gives a writer (a conversion, the quickstart) exclusive ownership of OUTPUT for the whole run and a
replace that keeps either the old or the new OUTPUT in place:

- a lock file `.<name>.transformers-mhc.lock` beside OUTPUT (`filelock`, released by the OS if the process dies):
  a second writer of the same OUTPUT fails at once with a clear error instead of racing the first one;
- a work folder `.<name>.transformers-mhc/` beside OUTPUT, holding the staging folder (`staging/`) and, during a
  replace, the old OUTPUT (`previous/`); it carries a marker file, so a later run can prove the folder is ours and
  recover from a killed run: put `previous/` back if OUTPUT is missing or incomplete, otherwise delete it, and delete
  a stale `staging/`;
- the replace itself is one atomic `renameat2(RENAME_EXCHANGE)` on Linux; elsewhere (or on file systems without it)
  two renames, whose interruption the next run repairs as above;
- OUTPUT given as a symlink to a folder is replaced at the link's target (the link keeps pointing to the new
  folder); a dangling symlink, a file, or an existing OUTPUT without `overwrite` is refused before anything is
  written.

The zero-byte lock file stays after the run (deleting a lock file that others may be waiting on is unsafe).
"""

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

LOCK_SUFFIX = ".transformers-mhc.lock"
WORK_SUFFIX = ".transformers-mhc"
MARKER_FILE = "TRANSFORMERS_MHC_WORK_FOLDER.json"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class OutputError(ValueError):
    """OUTPUT cannot be written as asked (the message says which path and what to do)."""


def lock_path(output: Path) -> Path:
    """The lock file guarding `output`."""
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def work_path(output: Path) -> Path:
    """The work folder (staging, previous OUTPUT during a replace) of `output`."""
    return output.parent / f".{output.name}{WORK_SUFFIX}"


def check_output_path(output: str | os.PathLike, overwrite: bool = False, what: str = "OUTPUT") -> Path:
    """Checks that `output` can be written (without writing anything) and returns the folder that will be written.

    That is `output` made absolute with its parent resolved, or the target of `output` when it is a symlink to a
    folder (replaced only with `overwrite`). Raises `OutputError` naming the path and what to do.
    """
    path = Path(output).expanduser()
    if path.name in ("", ".", ".."):
        raise OutputError(f"{what} {output} names no folder; give a folder name such as `my-model`.")
    path = path.absolute()
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            raise OutputError(
                f"{what} {path} is a symlink to {target}, which does not exist; remove the link or create its target."
            )
        if not target.is_dir():
            raise OutputError(f"{what} {path} is a symlink to the file {target}; it cannot become a folder.")
        if not overwrite:
            raise OutputError(
                f"{what} {path} already exists (a symlink to {target}); pass --overwrite to replace the folder it "
                f"points to, or choose another {what}."
            )
        path = target
    else:
        path = path.parent.resolve() / path.name
        if path.exists() and not path.is_dir():
            raise OutputError(
                f"{what} {path} exists and is a file; choose a folder name that does not exist."
            )
        if path.exists() and not overwrite:
            raise OutputError(
                f"{what} {path} already exists; pass --overwrite to replace it, or choose another {what}."
            )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"{what} {path} cannot be created: no permission to write into {ancestor}; choose a {what} in a folder "
            f"you can write to."
        )
    return path


class OutputFolder:
    """Exclusive, crash-safe writing of one output folder.

    ```python
    with OutputFolder("stories-mhc", overwrite=False) as out:
        model.save_pretrained(out.staging)  # write everything here
        out.commit()  # move it into place (replacing the old folder only now)
    ```

    With `in_place=True` the writer writes directly into `out.path` (for writers that record their own paths, such as
    the quickstart): an existing folder is first moved aside into the work folder and put back if the run fails; a
    run killed midway is repaired by the next one, which keeps the new folder only if `is_complete(path)` holds.

    Args:
        output (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`): replace an existing folder (or the target of a symlink to one).
        what (`str`): how error messages name the folder (`"OUTPUT"`, `"--output"`).
        in_place (`bool`): write into `path` instead of a staging folder (see above).
        is_complete (`Callable[[Path], bool]`): whether a folder left by a killed run is complete; by default any
            existing folder is (a staging writer only ever moves complete folders into place).
        may_replace (`Callable[[Path], bool]`): an existing folder this returns True for is replaced even without
            `overwrite` (the quickstart's own previous output).
    """

    def __init__(
        self,
        output: str | os.PathLike,
        overwrite: bool = False,
        what: str = "OUTPUT",
        in_place: bool = False,
        is_complete: Callable[[Path], bool] | None = None,
        may_replace: Callable[[Path], bool] | None = None,
    ) -> None:
        replaceable = overwrite
        candidate = Path(output).expanduser().absolute()
        if may_replace is not None and candidate.is_dir() and not candidate.is_symlink():
            replaceable = overwrite or may_replace(candidate)
        self.path = check_output_path(output, overwrite=replaceable, what=what)
        self.overwrite = replaceable
        self.what = what
        self.in_place = in_place
        self.is_complete = is_complete or (lambda path: path.exists())
        self.work = work_path(self.path)
        self.staging = self.path if in_place else self.work / "staging"
        self.previous = self.work / "previous"
        self.notes: list[str] = []  # what the recovery of an earlier, interrupted run did
        self.committed = False
        self._lock = FileLock(lock_path(self.path), timeout=0)

    # ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise OutputError(
                f"{self.what} {self.path} is being written by another transformers-mhc process (it holds "
                f"{lock_path(self.path)}); wait for it to finish or choose another {self.what}."
            ) from None
        try:
            self._recover()
            # Checked again under the lock: another writer may have finished since `check_output_path`.
            if self.path.exists() and not self.overwrite:
                raise OutputError(
                    f"{self.what} {self.path} already exists; pass --overwrite to replace it, or choose another "
                    f"{self.what}."
                )
            self.work.mkdir()
            marker = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "output": str(self.path),
            }
            (self.work / MARKER_FILE).write_text(json.dumps({**marker, "in_place": self.in_place}) + "\n")
            if self.in_place:
                if self.path.exists():
                    self.path.rename(self.previous)
                self.path.mkdir()
            else:
                self.staging.mkdir()
        except BaseException:
            if self.in_place and self.previous.exists() and not self.path.exists():
                self.previous.rename(self.path)  # the old folder was moved aside just before the failure
            self._release()
            raise
        return self

    def commit(self) -> None:
        """Puts the new folder in place; the old one is deleted only once the new one is there."""
        if self.in_place:
            shutil.rmtree(self.previous, ignore_errors=True)
            self.committed = True
            return
        if self.path.exists():
            if not self.overwrite:
                raise OutputError(
                    f"{self.what} {self.path} appeared while it was written; it was left untouched."
                )
            if _renameat2(self.staging, self.path, _RENAME_EXCHANGE):
                shutil.rmtree(self.staging)  # now the old folder
            else:
                self.path.rename(self.previous)  # a kill from here on is repaired by the next run
                try:
                    self.staging.rename(self.path)
                except BaseException:
                    self.previous.rename(self.path)
                    raise
                shutil.rmtree(self.previous)
        elif not _renameat2(self.staging, self.path, _RENAME_NOREPLACE):
            self.staging.rename(self.path)
        self.committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if not self.committed and self.in_place and self.work.exists():
                # The run failed: remove what it wrote and put the old folder back.
                shutil.rmtree(self.path, ignore_errors=True)
                if self.previous.exists():
                    self.previous.rename(self.path)
            if self.committed or not self.previous.exists():
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self._release()

    # ----------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def _recover(self) -> None:
        """Repairs what a killed run left in the work folder (only a folder carrying our marker is touched)."""
        if not self.work.exists():
            return
        marker = self.work / MARKER_FILE
        if not self.work.is_dir() or (any(self.work.iterdir()) and not marker.is_file()):
            raise OutputError(
                f"{self.work} exists but was not created by transformers-mhc (no {MARKER_FILE}); move it away and "
                f"run again."
            )
        try:
            in_place = bool(json.loads(marker.read_text()).get("in_place"))
        except (OSError, ValueError):
            in_place = False  # the marker was being written when the run died: nothing else was written yet
        if self.previous.exists():
            if self.path.exists() and self.is_complete(self.path):
                shutil.rmtree(self.previous)
                self.notes.append(
                    f"removed the old {self.what} kept by an interrupted run (the new one was complete)"
                )
            else:
                if self.path.exists():
                    shutil.rmtree(
                        self.path
                    )  # the incomplete output of the interrupted run, written under the lock
                self.previous.rename(self.path)
                self.notes.append(f"restored {self.path} as it was before an interrupted run")
        elif in_place and self.path.exists() and not self.is_complete(self.path):
            shutil.rmtree(self.path)
            self.notes.append(f"removed the incomplete {self.what} of an interrupted run")
        shutil.rmtree(self.work)


def fresh_path(path: str | os.PathLike, overwrite: bool = False, companions: tuple[str, ...] = ()) -> Path:
    """Where a result file may be written without replacing an existing one.

    `path` itself when neither it nor a companion written beside it (same stem, each suffix in `companions`, e.g.
    the `.png` plot of a `.json`) exists, or when `overwrite`; otherwise the first free `<stem>-<n><suffix>`.
    Benchmarks use it so that a run never replaces the committed results the README quotes unless told to.
    """
    path = Path(path)

    def taken(candidate: Path) -> bool:
        return any(candidate.with_suffix(suffix).exists() for suffix in (candidate.suffix, *companions))

    if overwrite or not taken(path):
        return path
    number = 2
    while taken(candidate := path.with_name(f"{path.stem}-{number}{path.suffix}")):
        number += 1
    return candidate


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """`renameat2(2)`; False where the OS or the file system does not support it (the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


__all__ = ["OutputError", "OutputFolder", "check_output_path", "fresh_path", "lock_path", "work_path"]
