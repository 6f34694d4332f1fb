"""Dataset files: present, downloaded from a checksummed mirror under a staging lock, or explained in one line."""
from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from kdtune.locks import staging_lock
from kdtune.errors import DatasetError

@dataclass(frozen=True)
class _Source:
    """Where a dataset's files come from: one mechanism for every dataset.

    `files` are (name, md5) pairs fetched from the first mirror that serves them. An archive (`extract`) is
    unpacked into data_dir and creates the dataset folder; plain files are saved into the folder itself.
    A source without mirrors cannot be downloaded (a login, no official host): `manual` says what to do,
    with {data_dir} and {folder} filled in.
    """

    mirrors: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    extract: bool = False
    manual: str = ""

    def how_to_get(self, data_dir: Path, folder: Path) -> str:
        if not self.mirrors:
            return self.manual.format(data_dir=data_dir, folder=folder)
        if self.extract:
            return f"download {self.mirrors[0]}{self.files[0][0]} and extract it into {data_dir} (so that {folder} exists)"
        names = ", ".join(name for name, _ in self.files)
        return f"download {names} from {self.mirrors[0]} into {folder}"


def _obtain(name: str, source: _Source, data_dir: Path, folder: Path, missing: Path, download: bool) -> None:
    """`missing` is the first required file not found: download what is missing, or end with one line saying
    how to get it. A failed download removes every file and folder it created."""
    how = source.how_to_get(data_dir, folder)
    if not source.mirrors:
        raise DatasetError(f"{name}: {missing} not found; {how}")
    if not download:
        raise DatasetError(f"{name}: {missing} not found and downloads are off; {how}")
    target = data_dir if source.extract else folder
    new_dirs = [d for d in (target, *target.parents) if not d.exists()]  # what we create, deepest first
    data_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (studies, nodes sharing one NFS data dir) may get here at once: one downloads, the
    # others wait on the lock and then find the files there.
    with staging_lock(data_dir, f"{name}-download") as lock_file:
        if missing.exists():
            return
        folder_existed = folder.exists()
        existed = {file for file, _ in source.files if (target / file).is_file()}
        # An archive already here may be the one to (re-)extract; download_url skips it when its checksum holds.
        wanted = [(file, md5) for file, md5 in source.files if source.extract or file not in existed]
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # a dead mirror should fail in seconds, not hang a study
        try:
            target.mkdir(parents=True, exist_ok=True)
            for file, md5 in wanted:
                _fetch(name, source, file, md5, target, how)
        except DatasetError:
            for file, _ in wanted:
                if file not in existed:
                    (target / file).unlink(missing_ok=True)
            if not folder_existed:
                shutil.rmtree(folder, ignore_errors=True)  # half-extracted archive
            if data_dir in new_dirs:
                lock_file.unlink(missing_ok=True)  # leave nothing behind in a folder we made
            for directory in new_dirs:
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
            raise
        finally:
            socket.setdefaulttimeout(previous)


def _fetch(name: str, source: _Source, file: str, md5: str, target: Path, how: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    errors = []
    for mirror in source.mirrors:
        try:
            if source.extract:
                download_and_extract_archive(mirror + file, download_root=str(target), md5=md5)
            else:
                download_url(mirror + file, str(target), md5=md5)
            return
        except Exception as error:  # offline, DNS, HTTP, checksum: try the next mirror, then explain
            errors.append(f"{type(error).__name__}: {error}")
    others = f"; {len(errors) - 1} other mirror(s) failed too" if len(errors) > 1 else ""
    raise DatasetError(
        f"could not download {source.mirrors[0]}{file} for {name} ({errors[0]}{others}); "
        f"on a machine without internet, {how}, then run again"
    ) from None
