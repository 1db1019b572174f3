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


# ---- against a real S3 API (moto's server on 127.0.0.1; see conftest.s3_endpoint) ----------

def _bucket(name: str) -> str:
    from conftest import S3_BUCKET

    return f"s3://{S3_BUCKET}/{name}"


def test_s3_endpoint_from_the_environment_is_used(s3_endpoint):
    fs, path = storage.resolve(_bucket("x/y"))
    assert isinstance(fs, pafs.S3FileSystem) and path.endswith("/x/y")
    storage.write_text(_bucket("endpoint/hello.txt"), "hi")
    assert storage.read_text(_bucket("endpoint/hello.txt")) == "hi"
    assert storage.list_files(_bucket("endpoint")) == [_bucket("endpoint/hello.txt")]


def test_publish_dir_round_trips_through_s3_and_replaces_the_old_copy(s3_endpoint, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "config.json").write_text("{}")
    (src / "metadata.json").write_text('{"method": "lora"}')
    uri = _bucket("publish/adapter")
    storage.write_text(storage.join(uri, "stale.txt"), "old")  # a previous copy goes away
    storage.publish_dir(str(src), uri, marker="metadata.json")
    assert storage.read_json(storage.join(uri, "metadata.json")) == {"method": "lora"}
    assert not storage.exists(storage.join(uri, "stale.txt"))
    local = storage.local_dir(uri)
    assert local != str(src)
    assert open(os.path.join(local, "weights.bin"), "rb").read() == b"\x00\x01" * 1000
    assert open(os.path.join(local, "sub", "config.json")).read() == "{}"
    assert storage.find_dirs_with(_bucket("publish"), "config.json") == ["adapter/sub"]


def test_publish_dir_locally_swaps_the_directory_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("new")
    dst = tmp_path / "out" / "model"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    storage.publish_dir(str(src), str(dst))
    assert sorted(os.listdir(dst)) == ["a.txt"] and storage.local_dir(str(dst)) == str(dst)
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]


def test_local_dir_of_a_missing_bucket_path_names_it(s3_endpoint):
    with pytest.raises(FileNotFoundError, match="publish/nothing"):
        storage.local_dir(_bucket("publish/nothing"))


def test_stage_shards_on_s3_count_and_drop_an_unreadable_shard(s3_endpoint):
    import pandas as pd

    from lambert_ray import stage

    out = _bucket("stage/annotate")
    storage.write_parquet(pd.DataFrame({"row_id": ["a", "b"], "error": [None, "empty_text"]}),
                          storage.join(out, "0.parquet"))
    storage.write_bytes(storage.join(out, "1.parquet"), b"PAR1 cut short by a kill")
    assert stage.written_rows(out) == 2
    assert storage.list_files(out, ".parquet") == [storage.join(out, "0.parquet")]
    assert stage._count_output(out) == (1, 1)
    assert stage.stage_complete(out) is None
    assert list(stage.read_output(out, ["row_id"])["row_id"]) == ["a", "b"]
