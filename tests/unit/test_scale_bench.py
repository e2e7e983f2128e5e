"""bench/scale.py's growth fit, its report section and a quick run of two stages; the cluster
stage's process roles and its USS slopes against the issue's bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402
from scale_common import row  # noqa: E402


def test_slopes_fit_log_time_and_memory_against_log_size():
    rows = [row("data", "prepare", n, "interactions", 2e-6 * n, 100 + n / 1e4) for n in (1e6, 5e6, 2e7)]
    rows += [row("data", "sort", n, "interactions", 1e-9 * n**1.5, 50) for n in (1e6, 2e7)]
    rows += [row("train", "step_1_worker", n, "items", 0.03, 800) for n in (1e4, 1e5, 1e6)]
    rows += [row("index", "auto build", n, "items", 1.0, 10, growth=False) for n in (1e5, 1e6)]
    rows += [row("infer", "ray2_1000k_items", 1e5, "users", 9.0, 10)]  # one size: no slope
    fitted = {(f["stage"], f["step"]): f for f in scale.slopes(rows)}
    assert set(fitted) == {("data", "prepare"), ("data", "sort"), ("train", "step_1_worker")}
    assert fitted["data", "prepare"]["time_slope"] == pytest.approx(1.0) and fitted["data", "prepare"]["within"]
    assert 0 < fitted["data", "prepare"]["memory_slope"] < 1
    assert fitted["data", "sort"]["time_slope"] == pytest.approx(1.5) and not fitted["data", "sort"]["within"]
    # a training step must not grow with the catalog: expected slope 0
    assert fitted["train", "step_1_worker"]["expected"] == 0 and fitted["train", "step_1_worker"]["time_slope"] == pytest.approx(0.0, abs=1e-9)


def test_the_section_between_the_markers_is_replaced_and_the_rest_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\nbefore\n")
    scale.write_section(doc, "first\n")
    scale.write_section(doc, "second\n")
    text = doc.read_text()
    assert text.startswith("# B\n\nbefore\n") and "second" in text and "first" not in text
    assert text.count(scale.BEGIN) == 1 and text.count(scale.END) == 1


def test_a_quick_run_of_the_data_and_index_stages_writes_rows_slopes_and_a_plot(tmp_path):
    out = tmp_path / "out"
    docs_before = (ROOT / "docs" / "benchmarks.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--stages", "data", "index", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "scale.json").read_text())
    steps = {(r["stage"], r["step"]) for r in result["rows"]}
    assert {("data", "generate"), ("data", "prepare"), ("data", "split"), ("data", "datamodule"), ("index", "exact search")} <= steps
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert {(f["stage"], f["step"]) for f in result["slopes"]} >= {("data", "prepare"), ("index", "auto search")}
    assert (out / "scale_growth.png").stat().st_size > 10_000
    assert "### Growth" in proc.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs_before  # quick figures never reach docs/


def test_the_cluster_stage_names_processes_by_their_ray_title_and_checks_uss_slopes_against_the_bounds():
    import scale_cluster as sc

    assert sc.role_of("ray::RayTrainWorker.__execute") == "train_worker"
    assert sc.role_of("ray::MapWorker(MapBatches(UserPart)).submit") == "user_actor"
    assert sc.role_of("ray::ReadParquet->MapBatches(tag_bucket)") == "data_task"
    assert sc.role_of("ray::IDLE") == "idle_worker"
    assert sc.role_of("/x/raylet --node_id=1") == "ray_system"
    uss = {"train/driver": lambda n: 500.0, "train/train_worker": lambda n: 600 + n / 1e5}  # flat; and 600 -> 1600 MiB
    rows = [row("cluster", step, n, "interactions", 1.0, f(n), uss_mb=f(n), pss_mb=f(n)) for step, f in uss.items() for n in (5e6, 2e7, 1e8)]
    fitted = {s["step"]: s for s in sc.uss_slopes(rows)}
    assert fitted["train/driver"]["uss_slope"] == pytest.approx(0.0, abs=1e-9) and fitted["train/driver"]["within"]
    assert fitted["train/train_worker"]["bound"] == 0.15 and not fitted["train/train_worker"]["within"]
    assert "| train/train_worker | 5,000,000, 20,000,000, 100,000,000 |" in sc.table(rows)


def test_the_benches_name_processes_the_inference_code_still_defines():
    import scale_cluster
    import scale_infer

    from jobs.runtime.stages import batch_inference, sharded_inference

    defined = set(vars(sharded_inference)) | set(vars(batch_inference))
    named = set(scale_infer.ACTORS) | {key for key, role in scale_cluster.ROLES if role in ("user_actor", "item_actor", "index_task")}
    assert named and named <= defined, sorted(named - defined)  # a renamed task would drop out of the memory tables
