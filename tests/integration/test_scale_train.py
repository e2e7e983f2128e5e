"""bench/scale_train.py's quick mode: real fine-tuning runs on Ray Train at two tiny catalogs."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_train_stage_quick_mode_measures_steps_start_up_and_validation(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import scale_train

    rows = scale_train.run_stage(out_dir=tmp_path, quick=True)
    steps = {r["step"] for r in rows}
    assert steps == {"step_1_worker", "startup_1_worker", "validate_full_ranking"}
    assert sorted({r["size"] for r in rows}) == [300, 600]
    for r in rows:
        assert r["stage"] == "train" and r["unit"] == "items" and r["seconds"] > 0 and r["peak_rss_mb"] > 100
    for r in (r for r in rows if r["step"] == "step_1_worker"):
        assert r["samples_per_s"] > 0 and r["steps"] >= 2
    assert all(r["catalog_s"] >= 0 and r["users"] > 0 for r in rows if r["step"] == "validate_full_ranking")
