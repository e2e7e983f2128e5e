"""Stage ``index`` of bench/scale.py: top-100 retrieval by exact and approximate FAISS indexes.

    python bench/scale_index.py                               # 100 k and 1 M items, 1,000 queries
    python bench/scale_index.py --items 100000 1000000 --queries 1000 --like outputs/pipeline/<date>/<time>

For each catalog size it builds FAISS flat (exact), IVF, HNSW and IVF-PQ (4-bit fast-scan codes,
candidates re-ranked exactly) indexes over item vectors and searches top-100 for the same user
vectors, reporting build seconds, queries/s (the fastest of two searches), recall@100 against the
exact search, and speed-up over it, all measured in this run. The setting that
``infer.index.kind=auto`` picks for each size (inference/faiss_index.py: auto_index) is marked.

The vectors are not random noise: they are drawn with the mean and the singular spectrum of a
trained model's item and user vectors (``--like``: a pipeline run's batch_infer embeddings;
default the newest ml100k pipeline run; with none, a power-law spectrum, said in the output), so
the search is as hard as on that model's space.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale_common import in_fresh_process, row, say  # noqa: E402

K = 100


def embeddings(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)


def newest_ml100k_run() -> Path | None:
    runs = sorted((ROOT / "outputs" / "pipeline").glob("*/*/batch_infer/item_embeddings.parquet"))
    runs = [r.parents[1] for r in runs if "ml100k" in (r.parents[1] / "config.yaml").read_text()]
    return runs[-1] if runs else None


def spectra(like: Path | None, dim: int = 64, seed: int = 0) -> tuple[Spectrum, Spectrum, str]:
    """Item and user spectra of a trained model's vectors (``like``), else a power-law stand-in."""
    if like is not None:
        return (
            Spectrum(embeddings(like / "batch_infer" / "item_embeddings.parquet")),
            Spectrum(embeddings(like / "batch_infer" / "user_embeddings.parquet")),
            f"vectors shaped like {like}",
        )
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    shaped = rng.standard_normal((4 * dim, dim)) * np.arange(1, dim + 1) ** -0.5 @ basis
    return (
        Spectrum(shaped + 0.3),
        Spectrum(shaped - 0.1),
        "no trained ml100k run found: vectors with a power-law spectrum (run `make run` for a trained model's)",
    )


class Spectrum:
    """The mean and the principal axes with their spreads of a set of vectors; draws more like them."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.scale = s / np.sqrt(len(x))
        self.axes = vt

    def draw(self, n: int, rng: np.random.Generator, chunk: int = 200_000) -> np.ndarray:
        out = np.empty((n, self.mean.shape[0]), dtype=np.float32)
        for start in range(0, n, chunk):
            z = rng.standard_normal((min(chunk, n - start), self.scale.shape[0]))
            out[start : start + len(z)] = self.mean + (z * self.scale) @ self.axes
        return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, exact)]
    return float(np.mean(hits)) / exact.shape[1]


def timed_search(index, queries: np.ndarray, repeats: int = 2) -> tuple[np.ndarray, float]:
    """Top-K ids and the fastest of ``repeats`` searches (this machine is shared: the minimum is
    the least disturbed measurement, for the exact baseline and every index alike)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, K)
        best = min(best, time.perf_counter() - start)
    return ids, best


def index_size(n: int, num_queries: int, items_like: Spectrum, users_like: Spectrum, seed: int, quick: bool) -> list[dict]:
    """Every index kind and setting at ``n`` items (run in a fresh process: its peak RSS is this size's)."""
    import faiss

    from inference.faiss_index import auto_index, build_index

    rng = np.random.default_rng(seed)
    items, users = items_like.draw(n, rng), users_like.draw(num_queries, rng)
    say(f"index: {n:,} items x {items.shape[1]} dims, {num_queries:,} queries")
    start = time.perf_counter()
    flat = build_index(items, "flat")
    flat_build = time.perf_counter() - start
    exact, flat_seconds = timed_search(flat, users)
    del flat
    base = {"items": n, "dim": items.shape[1], "queries": num_queries, "threads": faiss.omp_get_max_threads()}
    auto = auto_index(n)
    rows = [
        base
        | {
            "kind": "flat",
            "setting": "exact",
            "build_s": flat_build,
            "search_s": flat_seconds,
            "qps": num_queries / flat_seconds,
            "recall": 1.0,
            "speedup": 1.0,
            "auto": auto.kind == "flat",
        }
    ]
    if quick:
        settings = [("ivf", {"nlist": int(4 * np.sqrt(n)), "nprobe": 16}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})]
    else:
        settings = [("ivf", {"nlist": int(2 * np.sqrt(n)), "nprobe": p}) for p in (16, 32, 64, 128, 256)]
        settings += [("hnsw", {"hnsw_m": 32, "ef_search": ef}) for ef in (128, 256, 512, 768)]
        settings += [("ivfpq", {"nlist": int(2 * np.sqrt(n)), "nprobe": p, "refine_factor": r}) for r in (16, 8) for p in (64, 128, 256)]
    if auto.kind != "flat" and (auto.kind, auto.params) not in settings:
        settings.append((auto.kind, auto.params))
    built: dict = {}
    for kind, params in settings:
        build_key = (kind, params.get("nlist"), params.get("hnsw_m"))  # nprobe, ef_search and refine_factor are set at search time
        if build_key not in built:
            built.clear()  # one built index alive at a time: the peak RSS is the largest index's
            start = time.perf_counter()
            built[build_key] = (build_index(items, kind, **params), time.perf_counter() - start)
        index, build_s = built[build_key]
        if kind == "ivf":
            index.nprobe = params["nprobe"]
        elif kind == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = params["nprobe"]
            index.k_factor = params["refine_factor"]  # IndexRefineFlat: candidates re-ranked per result
        else:
            index.hnsw.efSearch = params["ef_search"]
        ids, seconds = timed_search(index, users)
        row = base | {
            "kind": kind,
            "setting": ", ".join(f"{k}={v}" for k, v in params.items()),
            "build_s": build_s,
            "search_s": seconds,
            "qps": num_queries / seconds,
            "recall": recall(ids, exact),
            "speedup": flat_seconds / seconds,
            "auto": auto.kind == kind and auto.params == params,
        }
        rows.append(row)
        say(
            f"  {kind:5s} {row['setting']:28s} build {build_s:7.1f} s  {row['qps']:9.0f} q/s  recall@{K} {row['recall']:.4f}  x{row['speedup']:.1f}{'  <- auto' if row['auto'] else ''}"
        )
    return rows


def run_stage(
    sizes: list[int] | None = None, out_dir: Path | None = None, quick: bool = False, queries: int | None = None, like: Path | None = None, seed: int = 0
) -> list[dict]:
    """Rows of every index at every size, plus the growth rows (bench/scale_common.py format) of
    exact search and of what ``auto`` builds: its build and its search of all queries. Nothing is
    written (``out_dir`` is unused)."""
    sizes = sizes or ([5_000, 20_000] if quick else [100_000, 1_000_000])
    queries = queries or (200 if quick else 1000)
    items_like, users_like, source = spectra(like if like is not None else newest_ml100k_run(), seed=seed)
    say(f"index: {source}")
    rows: list[dict] = []
    for n in sizes:
        found, rss = in_fresh_process(index_size, n, queries, items_like, users_like, seed, quick)
        rows += [
            r
            | {
                "stage": "index",
                "step": f"{r['kind']} {r['setting']}",
                "size": n,
                "unit": "items",
                "seconds": r["search_s"],
                "peak_rss_mb": rss,
                "source": source,
                "growth": False,
            }
            for r in found
        ]
        exact = found[0]
        auto = next(r for r in found if r["auto"])
        rows.append(row("index", "exact search", n, "items", exact["search_s"], rss, queries=queries, growth=True))
        # not a growth row: auto builds another kind of index above 100,000 items
        rows.append(row("index", "auto build", n, "items", auto["build_s"], rss, kind=auto["kind"], growth=False))
        rows.append(row("index", "auto search", n, "items", auto["search_s"], rss, kind=auto["kind"], recall=auto["recall"], queries=queries, growth=True))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| items | index | setting | build s | queries/s | recall@100 | speed-up vs exact | auto |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "kind" in r and "setting" in r:
            lines.append(
                f"| {r['items']:,} | {r['kind']} | {r['setting']} | {r['build_s']:.1f} | {r['qps']:,.0f} | {r['recall']:.4f} | {r['speedup']:.1f}x | {'yes' if r.get('auto') else ''} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--like", type=Path, default=None, help="a pipeline run whose batch_infer embeddings give the vectors' spectrum")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(table(run_stage(args.items, Path("."), queries=args.queries, like=args.like, seed=args.seed)))


if __name__ == "__main__":
    main()
