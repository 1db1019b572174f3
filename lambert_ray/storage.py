"""Where a run's outputs live: a local dir, or an `s3://` / `gs://` (or `file://`) URI.

Every stage writes through these helpers, so the same config runs on a laptop (local `runs/`)
and on a cluster (a bucket every node can reach). URIs resolve to a pyarrow filesystem plus a
path inside it; Ray Data takes the same pair (`ds.write_parquet(path, filesystem=fs)`).

Credentials come from the environment the way pyarrow reads them (AWS_* / instance profile for
S3, GOOGLE_APPLICATION_CREDENTIALS / metadata server for GCS); nothing here handles secrets.
S3-compatible stores (MinIO, Cloudflare R2, a local test server) are reached through the AWS
SDK's standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variable, which pyarrow's `from_uri`
does not read by itself.

Models are directories of files that HF loads from local disk: `publish_dir` uploads one (its
marker file last, so a reader that sees the marker sees a complete directory) and `local_dir`
gives a local copy of one to load from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from lambert_ray.config import join_uri

# Schemes pyarrow resolves to a remote filesystem; anything else without '://' is a local path.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def scheme(uri: str) -> str:
    """The URI scheme ('s3', 'gs', 'file'), or '' for a plain local path."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def is_remote(uri: str) -> bool:
    """True for URIs that every node of a cluster can reach (object stores, HDFS)."""
    return scheme(uri) in REMOTE_SCHEMES


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or URI into (pyarrow filesystem, path inside it).

    Local paths (relative or `file://`) become absolute: a job's working directory is a
    temporary copy, so a relative output dir is pinned to where the process runs.
    """
    if not scheme(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    fs, path = _filesystem_from_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment (AWS SDK convention), if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # One seam for tests to stand a bucket in with an in-memory filesystem.
    if scheme(uri) == "s3" and (endpoint := s3_endpoint()):
        parts = urlsplit(uri)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        region = (query.get("region") or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region)
        return fs, (parts.netloc + parts.path).rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/' (keeps the scheme and bucket)."""
    return join_uri(base, *parts)


def parent(uri: str) -> str:
    """The URI or path one level up (`s3://b/runs/x` -> `s3://b/runs`)."""
    head, sep, _ = uri.rstrip("/").rpartition("/")
    return head if sep and head and not head.endswith(":/") else uri


def makedirs(uri: str) -> None:
    """Create the directory (and parents). Object stores have no real dirs: a no-op there."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    """Whether a file or directory exists at the URI."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """Whether a directory exists at the URI."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole (small) file, creating parent dirs; replaces an existing file."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    """Read a whole (small) file. Raises FileNotFoundError when it is missing."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text to a file at the URI."""
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    """Read a UTF-8 text file at the URI."""
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str, obj: Any) -> None:
    """Write `obj` as indented JSON (metrics, manifests, stage status)."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str) -> Any:
    """Read a JSON file written by `write_json`."""
    return json.loads(read_text(uri))


def list_dir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under a directory, sorted; [] if missing."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(info.base_name for info in infos)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Full URIs/paths of the files directly under a directory ending in `suffix`, sorted."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
             if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]
    return [join(uri, n) for n in sorted(names)]


def find_dirs_with(uri: str, name: str) -> list[str]:
    """Relative paths (from `uri`) of the directories under it that hold a file called `name`."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name == name:
            found.append(os.path.relpath(info.path.rsplit("/", 1)[0], path))
    return sorted(found)


def delete_file(uri: str) -> None:
    """Remove one file; a missing file is not an error."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    """Remove a directory and everything under it; a missing directory is not an error."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def read_parquet(uri: str, columns: list[str] | None = None):
    """One Parquet file (or a directory of them) as a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_parquet(table, uri: str) -> None:
    """Write a pyarrow Table or pandas DataFrame as one Parquet file at the URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def publish_dir(local: str, uri: str, marker: str | None = None) -> None:
    """Replace the directory at `uri` with a copy of the local directory `local`.

    Local targets are swapped in with one rename; on object stores (no rename) the files are
    uploaded with `marker` (e.g. metadata.json) last, so whoever sees the marker sees them all.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(tmp, path)
        return
    delete_dir(uri)
    fs.create_dir(path, recursive=True)
    files = sorted(os.path.relpath(os.path.join(d, f), local)
                   for d, _, names in os.walk(local) for f in names)
    for rel in sorted(files, key=lambda r: r == marker):  # the marker (if any) last
        pafs.copy_files(os.path.join(local, rel), f"{path}/{rel}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_dir(uri: str) -> str:
    """A local directory holding the files at `uri`: the path itself when local, else a fresh
    download into a temporary directory (for HF `from_pretrained`, which reads local files)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no directory at {uri}")
    dest = tempfile.mkdtemp(prefix="lambert_ray_")
    pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def train_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for a Ray Train / Tune RunConfig: local dirs as an
    absolute path (Ray's own filesystem), remote URIs as a path inside our resolved filesystem
    (so an S3-compatible endpoint from the environment is honoured)."""
    fs, path = resolve(uri)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)
