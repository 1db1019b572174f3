"""The Ray Train run a model is fit in belongs to that model's output dir (no Ray needed)."""

from __future__ import annotations

import pytest

from lambert_ray.trainer import RUN_OWNER, claim_run


def test_a_run_name_serves_one_output_and_a_second_output_is_refused(tmp_path):
    runs = str(tmp_path / "students" / "_ray_train")
    a, b = str(tmp_path / "students" / "lora-lr0.0005"), str(tmp_path / "students" / "lora-lr0.001")
    claim_run(runs, "downstream-lora", a)
    assert (tmp_path / "students" / "_ray_train" / "downstream-lora" / RUN_OWNER).exists()
    claim_run(runs, "downstream-lora", a)  # the same output resumes its own run
    claim_run(runs, "downstream-lora", "students/lora-lr0.0005")  # read from another cwd
    with pytest.raises(ValueError, match=r"downstream-lora.*lora-lr0\.0005, not .*lora-lr0\.001"):
        claim_run(runs, "downstream-lora", b)  # would have published a's model as b's
    claim_run(runs, "downstream-lora-lr0.001", b)
