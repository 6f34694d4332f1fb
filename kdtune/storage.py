"""Where a study's Tune results live: a local folder or an object store (s3://bucket/prefix, gs://...).

One mechanism for both: a `Location` is a pyarrow filesystem plus a path on it, the same pair Ray Tune resolves
from `RunConfig(storage_path=str(location))` (pyarrow's `FileSystem.from_uri`), so kdtune's study file and Tune's
experiment state are read and written through one filesystem. An S3-compatible store (MinIO, Ceph, moto) is
reached by setting `AWS_ENDPOINT_URL` (pyarrow and boto3 both read it, in every process: the driver, each trial,
the MLflow server); credentials come from the usual AWS chain (environment, profile, instance role).

    location = Location.of("s3://bucket/kdtune")      # or a local path
    check_storage("s3://bucket/kdtune")               # before anything is created: one line if unusable
    (location / "study-1" / "kdtune_study.json").write_text("{}")

A remote location has no local path. `os.fspath()` of one gives a local scratch folder standing in for it:
files written there stay local (the study's HTML report is built there, then logged to MLflow).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from kdtune.deadlines import with_deadline
from kdtune.errors import ConfigError

CHECK_TIMEOUT_S = 20.0


def is_uri(value: str) -> bool:
    return "://" in str(value)


class Location:
    """A folder (or file) in the study storage."""

    def __init__(self, filesystem, path: str, uri: str | None = None):
        self.filesystem = filesystem  # a pyarrow.fs.FileSystem
        self.path = path.rstrip("/") or "/"  # the path on that filesystem (bucket/prefix for S3)
        self.uri = uri.rstrip("/") if uri else None  # the URI it came from (None: local)

    @classmethod
    def of(cls, value: str | os.PathLike) -> "Location":
        text = os.fspath(value) if not isinstance(value, Location) else str(value)
        if not is_uri(text) or text.startswith("file://"):
            from pyarrow import fs

            local = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve()
            return cls(fs.LocalFileSystem(), str(local))
        from pyarrow import fs

        try:
            filesystem, path = fs.FileSystem.from_uri(text)
        except (ValueError, OSError, TypeError) as error:
            raise ConfigError(f"storage {text}: {_first_line(error)}; use a local path or s3://BUCKET/PREFIX") from None
        return cls(filesystem, path, text)

    @property
    def is_remote(self) -> bool:
        return self.uri is not None

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        return Location(self.filesystem, f"{self.path}/{name}", f"{self.uri}/{name}" if self.uri else None)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri if self.uri else self.path

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __fspath__(self) -> str:
        if not self.is_remote:
            return self.path
        return str(scratch_folder(self))

    # ---- files ------------------------------------------------------------------------------------
    def _info(self):
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow import fs

        return self._info().type != fs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs

        return self._info().type == fs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs

        return self._info().type == fs.FileType.Directory

    def mkdir(self, exist_ok: bool = True) -> None:
        if not exist_ok and self.exists():
            raise FileExistsError(str(self))
        self.filesystem.create_dir(self.path, recursive=True)

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, text: str) -> None:
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode("utf-8"))

    def list(self, recursive: bool = True) -> list[str]:
        """Paths of the files under this folder, relative to it."""
        from pyarrow import fs

        infos = self.filesystem.get_file_info(fs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        return sorted(i.path[len(self.path) + 1:] for i in infos if i.type == fs.FileType.File)


def scratch_folder(location: Location) -> Path:
    """A local folder standing in for a remote location (the same one for the same URI, in this process's
    temp dir)."""
    digest = hashlib.sha1(str(location).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"kdtune-scratch-{digest}" / location.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _with_deadline(fn, timeout_s: float, what: str):
    """Run fn() in a thread; a store that does not answer (a wrong endpoint, retries) is reported in time."""
    return with_deadline(fn, timeout_s, ConfigError(f"{what}: no answer within {timeout_s:.0f}s{_endpoint_note()}"))


def _endpoint_note() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint} from AWS_ENDPOINT_URL)" if endpoint else ""


def _check_aws_credentials(value: str) -> None:
    """S3 needs credentials (environment, profile, instance role); say so before anything is created."""
    try:
        import botocore.session
    except ImportError:  # without botocore pyarrow reports a missing credential at the first access below
        return
    if botocore.session.get_session().get_credentials() is None:
        raise ConfigError(f"--storage {value}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a node with an instance role)")


def check_storage(value: str | None, option: str = "--storage", timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Refuse, with one line naming the value, storage that cannot be used: an unknown scheme, a bucket that
    does not exist or cannot be reached, missing credentials, a local path that is a file."""
    if not value:
        return
    text = str(value)
    if not is_uri(text):
        path = Path(text).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {text}: is a file, not a folder")
        return
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        if scheme == "s3a":
            raise ConfigError(f"{option} {text}: use s3://BUCKET/PREFIX (s3a:// is Hadoop's name for it)")
        bucket = text.split("://", 1)[1].split("/", 1)[0]
        if len(bucket) < 3:
            raise ConfigError(f"{option} {text}: {bucket!r} is not a bucket name (3 to 63 characters); "
                              "use s3://BUCKET/PREFIX")
        _check_aws_credentials(text)
    try:
        location = _with_deadline(lambda: Location.of(text), timeout_s, f"{option} {text}")
    except ConfigError as error:
        raise ConfigError(str(error).replace("storage ", f"{option} ", 1)) from None
    from pyarrow import fs

    root = location.path.split("/", 1)[0] if location.is_remote else location.path
    try:
        info = _with_deadline(lambda: location.filesystem.get_file_info(root), timeout_s, f"{option} {text}")
    except OSError as error:
        raise ConfigError(f"{option} {text}: cannot be reached ({_first_line(error)}){_endpoint_note()}") from None
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"{option} {text}: bucket {root!r} does not exist{_endpoint_note()}; create it first "
                          f"(e.g. aws s3 mb s3://{root})")
    if location.exists() and not location.is_dir():
        raise ConfigError(f"{option} {text}: is a file, not a folder")
