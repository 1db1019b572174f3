"""Where a run's outputs live: a local dir, or an `s3://` / `gs://` (or `file://`) URI.

Every stage writes through these helpers, so the same config runs on a laptop (local `runs/`)
and on a cluster (a bucket every node can reach). URIs resolve to a pyarrow filesystem plus a
path inside it; Ray Data takes the same pair (`ds.write_parquet(path, filesystem=fs)`).

Credentials come from the environment the way pyarrow reads them (AWS_* / instance profile for
S3, GOOGLE_APPLICATION_CREDENTIALS / metadata server for GCS); nothing here handles secrets.
"""

from __future__ import annotations

import json
import os
from typing import Any

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


def _filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # One seam for tests to stand a bucket in with an in-memory filesystem.
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/' (keeps the scheme and bucket)."""
    return join_uri(base, *parts)


def makedirs(uri: str) -> None:
    """Create the directory (and parents). Object stores have no real dirs: a no-op there."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    """Whether a file or directory exists at the URI."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


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
