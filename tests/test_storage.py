"""Storage helpers: local paths and URIs resolve to pyarrow filesystems; small files round-trip."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from lambert_ray import storage


def test_relative_local_path_resolves_to_absolute_local_fs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("runs/demo")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == os.path.join(str(tmp_path), "runs", "demo")


def test_file_uri_resolves_to_local_fs(tmp_path):
    fs, path = storage.resolve(f"file://{tmp_path}/x")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/x"


def test_s3_and_gs_uris_resolve_to_object_store_filesystems_without_network():
    fs, path = storage.resolve("s3://my-bucket/runs/demo?region=us-east-1")
    assert isinstance(fs, pafs.S3FileSystem) and path == "my-bucket/runs/demo"
    fs, path = storage.resolve("gs://my-bucket/runs/demo")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "my-bucket/runs/demo"
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b/x")
    assert not storage.is_remote("runs/x") and not storage.is_remote("file:///tmp/x")


def test_join_keeps_scheme_and_bucket():
    assert storage.join("s3://bucket/runs/", "demo", "/metrics.json") == "s3://bucket/runs/demo/metrics.json"


def test_json_and_text_round_trip_and_parent_dirs_are_created(tmp_path):
    base = str(tmp_path / "out")
    storage.write_json(storage.join(base, "a", "metrics.json"), {"f1": 0.5, "n": 3})
    storage.write_text(storage.join(base, "a", "note.txt"), "héllo")
    assert storage.read_json(storage.join(base, "a", "metrics.json")) == {"f1": 0.5, "n": 3}
    assert storage.read_text(storage.join(base, "a", "note.txt")) == "héllo"
    assert storage.list_dir(storage.join(base, "a")) == ["metrics.json", "note.txt"]
    assert storage.exists(storage.join(base, "a")) and not storage.exists(storage.join(base, "b"))
    assert storage.list_dir(storage.join(base, "missing")) == []


def test_reading_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_text(str(tmp_path / "nope.txt"))


def test_helpers_go_through_the_resolved_filesystem_for_remote_uris(monkeypatch):
    # Stand in for a bucket: every s3:// URI lands in one in-memory pyarrow filesystem.
    mock = pafs._MockFileSystem()
    monkeypatch.setattr(storage, "_filesystem_from_uri", lambda uri: (mock, uri.split("://", 1)[1]))
    storage.makedirs("s3://bucket/runs/demo")
    storage.write_json("s3://bucket/runs/demo/stage.json", {"done": True})
    assert storage.read_json("s3://bucket/runs/demo/stage.json") == {"done": True}
    assert mock.get_file_info("bucket/runs/demo/stage.json").type == pafs.FileType.File
