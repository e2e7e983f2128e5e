"""The table of a bench/gpu_check.sh run: one row per run JSON in a folder, with each run's
speed and memory against the plain PyTorch loop of the same model measured in the same check.

  python bench/gpu_check_summary.py /tmp/gpu_check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def baseline_of(run: str, rows: dict[str, dict]) -> dict | None:
    """The plain loop of the same model (runs are named <model>-<strategy>[-...]): without
    activation checkpointing, else with it."""
    model = run.split("-")[0]
    for name in (f"{model}-plain", f"{model}-plain-ckpt"):
        base = rows.get(name)
        if base and "step_seconds" in base:
            return base
    return None


def table(folder: Path) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)}  # run order
    lines = [
        "| run | step s | samples/s | seq tokens/s | text tokens/s | items/step | TFLOP/step | MFU | peak GiB | speed vs plain | memory vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "step_seconds" not in r:
            lines.append(f"| {name} | {r.get('failed') or r.get('skipped')} |" + " |" * 9)
            continue
        base = baseline_of(name, rows)
        speed = f"{base['step_seconds'] / r['step_seconds']:.2f}x" if base else "-"
        memory = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}x" if base and r.get("peak_memory_gib") and base.get("peak_memory_gib") else "-"
        mfu = f"{100 * r['mfu']:.1f}%{'*' if r.get('flops_include_recompute') else ''}" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {name} | {r['step_seconds']:.3f} | {r['samples_per_second']:.1f} | {r['sequence_tokens_per_second']:.0f} | {r['text_tokens_per_second']:.0f} | "
            f"{r['items_encoded_per_step']:.0f} | {r['tflops_per_step']:.1f} | {mfu} | {r.get('peak_memory_gib') or '-'} | {speed} | {memory} |"
        )
    lines.append("")
    lines.append("MFU*: FLOPs counted with activation checkpointing include the recomputed forward passes.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_check")))
