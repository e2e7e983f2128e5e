"""bench/scale_infer.py (stage ``infer`` of bench/scale.py) at a tiny size: real bundle, real Ray Data, real FAISS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_infer_stage_measures_every_path(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import scale_infer

    rows = scale_infer.run_stage([(400, 600)], tmp_path, paths=("local", "ray2"))
    assert [r["path"] for r in rows] == ["local", "ray2"]
    for r in rows:
        assert r["stage"] == "infer" and r["step"] == f"{r['path']}_600_items" and r["unit"] == "users"
        assert 300 <= r["size"] <= 400 and r["items"] == 600 and r["index"] == "flat" and r["untrained"]
        assert r["users_per_s"] == pytest.approx(r["size"] / r["seconds"]) and r["peak_rss_mb"] > 100
        phases = r["phases"]
        assert phases["embed_items"] > 0 and phases["embed_users"] > 0 and phases["search"] > 0
        assert sum(phases.values()) <= r["seconds"] + 0.01
    assert rows[0]["phases"]["ray_start"] == 0 < rows[1]["phases"]["ray_start"]
    assert (tmp_path / "infer" / "bundle_u400_i600" / "manifest.json").is_file()  # made once, kept for the next run
    assert not (tmp_path / "infer" / "run_u400_i600_local").exists()  # the recommendations of a run are not kept
    assert "| 600 | local | flat |" in scale_infer.table(rows)
