"""Resume and sampling that scale: the sample is drawn by a hash threshold (same rows as a full
sort), and a resumed stage drops the rows already written with a Ray Data anti-join, writing
every row exactly once."""

from __future__ import annotations

import pandas as pd
import pytest

from lambert_ray.config import ResourcesConfig
from lambert_ray.data import _sample_key, sample
from lambert_ray.stage import read_output, remaining_rows, run_pool_stage, written_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N = 2000


def _corpus(ray, n: int = N):
    ids = [f"r{i:05d}" for i in range(n)]
    return ray.data.from_pandas(pd.DataFrame({"row_id": ids, "text": [f"t {i}" for i in range(n)],
                                              "label": [None] * n, "error": [None] * n}))


def _full_sort_sample(n_rows: int, n: int, seed: int) -> list[str]:
    ids = pd.Series([f"r{i:05d}" for i in range(n_rows)])
    return ids.iloc[_sample_key(ids, seed).argsort(kind="stable")[:n]].tolist()


def test_threshold_sample_is_the_full_sorts_n_smallest_keys(ray_local):
    ds = _corpus(ray_local)
    expected = _full_sort_sample(N, 50, seed=7)
    got = sample(ds, 50, seed=7).to_pandas()["row_id"].tolist()
    assert got == expected
    # `total` far too small: the threshold is raised and the pass redone, same rows
    assert sample(ds.repartition(5), 50, seed=7, total=10).to_pandas()["row_id"].tolist() == expected
    assert sample(ds, N + 10, seed=7).count() == N  # more than there is: everything


@pytest.mark.parametrize("set_max", [0, 10**6], ids=["anti_join", "small_id_set"])
def test_resume_scores_only_missing_rows_and_writes_each_once(ray_local, tmp_path, monkeypatch,
                                                              set_max):
    from lambert_ray import stage

    monkeypatch.setattr(stage, "RESUME_SET_MAX_IDS", set_max)
    out = tmp_path / "classify"
    out.mkdir()
    done = _corpus(ray_local).to_pandas().iloc[: N // 2].assign(label="x")
    for k in range(4):  # the first half, as shards written before a kill
        done.iloc[k::4].to_parquet(out / f"killed_{k}.parquet")
    (out / "cut_short.parquet").write_bytes(b"PAR1 no footer")
    assert written_rows(str(out)) == N // 2 and not (out / "cut_short.parquet").exists()

    todo = remaining_rows(_corpus(ray_local), str(out), N).to_pandas()
    assert sorted(todo["row_id"]) == [f"r{i:05d}" for i in range(N // 2, N)]

    class Echo:  # a stand-in scorer (local, so Ray pickles it by value)
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            return batch.assign(label="x")

    res = ResourcesConfig(batch_size=64, num_cpus=0.25, max_actors=1)
    counts = run_pool_stage(_corpus(ray_local), Echo, {}, res, str(out), name="classify", rows_in=N)
    result = read_output(str(out), ["row_id", "label"])
    assert result["row_id"].is_unique and len(result) == N and (result["label"] == "x").all()
    assert counts.resumed_rows == N // 2 and counts.balanced
