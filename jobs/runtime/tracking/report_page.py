"""The HTML report of a run, pipeline or sweep folder: one page with plots and tables,
readable without a server (``<folder>/report/index.html`` with PNG files beside it).

Plots: training loss and validation NDCG@10 per epoch of every training run found under the
folder (``metrics_history.jsonl``), the best metric of each sweep trial, and accuracy against
diversity (validation NDCG@10 vs diversity@10 at each run's best epoch). Tables: the folder's
``metrics.json`` and ``trials.parquet``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ACCURACY, DIVERSITY = "val/ndcg@10", "val/diversity@10"


def load_histories(folder: Path) -> dict[str, pd.DataFrame]:
    """Per-epoch metrics of every training run under ``folder``, keyed by its path relative to it."""
    out = {}
    for path in sorted(folder.rglob("metrics_history.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:  # a resumed run repeats epochs: keep the last record of each
            df = pd.DataFrame(rows).drop_duplicates("epoch", keep="last").sort_values("epoch")
            out[str(path.parent.relative_to(folder)) or "."] = df
    return out


def plot_curves(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, df in histories.items():
        label = name if len(name) <= 40 else "…" + name[-39:]
        ax_loss.plot(df["epoch"], df["train/loss"], marker=".", label=label)
        if ACCURACY in df:
            ax_val.plot(df["epoch"], df[ACCURACY], marker=".", label=label)
    ax_loss.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    ax_val.set(title="validation NDCG@10", xlabel="epoch", ylabel="NDCG@10")
    if len(histories) <= 12:
        ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trial_number(trial: str) -> str:
    """The trial's counter in its Tune name (``<trainable>_<run id>_<00003>_...``), else the name."""
    found = re.search(r"_[0-9a-f]{5}_(\d{5})(?:_|$)", trial)
    return found.group(1) if found else trial


def plot_trials(trials: pd.DataFrame, metric_col: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(trials) + 2), 4.5))
    colors = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red"}
    short = [trial_number(t) for t in trials["trial"]]
    ax.bar(range(len(trials)), trials[metric_col].fillna(0), color=[colors.get(s, "gray") for s in trials["status"]])
    ax.set_xticks(range(len(trials)), short, rotation=60, fontsize=7)
    ax.set(title=f"{metric_col} per trial (orange: stopped early by ASHA)", ylabel=metric_col)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(histories: dict[str, pd.DataFrame], path: Path) -> Path | None:
    points = []
    for name, df in histories.items():
        if ACCURACY in df and DIVERSITY in df:
            best = df.loc[df[ACCURACY].idxmax()]
            points.append((name, best[ACCURACY], best[DIVERSITY]))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[2] for p in points], [p[1] for p in points])
    for name, acc, div in points:
        ax.annotate(name.split("/")[-1][:24], (div, acc), fontsize=6)
    ax.set(title="accuracy vs diversity (best epoch of each run)", xlabel="diversity@10", ylabel="NDCG@10")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda x: f"{x:.4f}", border=0, classes="t")


def write_report(folder: str | Path) -> Path:
    """Write ``<folder>/report/index.html`` and its plots; returns the HTML path."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    out = folder / "report"
    out.mkdir(exist_ok=True)
    histories = load_histories(folder)
    sections, images = [], []
    if histories:
        images.append(("Training and validation curves", plot_curves(histories, out / "curves.png")))
        trade = plot_tradeoff(histories, out / "accuracy_vs_diversity.png")
        if trade:
            images.append(("Accuracy and diversity", trade))
    trials_path = folder / "trials.parquet"
    if trials_path.is_file():
        trials = pd.read_parquet(trials_path)
        metric_col = next((c for c in trials.columns if c.startswith("best_")), None)
        if metric_col:
            images.append(("Sweep trials", plot_trials(trials, metric_col, out / "trials.png")))
        sections.append(("Trials", table_html(trials)))
    metrics_path = folder / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        sections.append(("Final metrics (metrics.json)", table_html(pd.DataFrame(sorted(metrics.items()), columns=["metric", "value"]))))
    if not images and not sections:
        raise FileNotFoundError(f"{folder}: nothing to report (no metrics_history.jsonl, trials.parquet or metrics.json)")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>towerrec report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1300px} table.t{border-collapse:collapse;font-size:12px}"
        " table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right} img{max-width:100%}</style></head><body>",
        f"<h1>Report: {html.escape(str(folder))}</h1>",
    ]
    for title, image in images:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{image.name}' alt='{html.escape(title)}'>")
    for title, body in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page
