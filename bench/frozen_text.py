"""What a training worker pays at start-up for a fully frozen text encoder's catalog encodings:
encoding the whole catalog itself (before) against memory-mapping the file written once
(``jobs/runtime/config/text_encodings.py``, after), and what two workers on one node hold of it.

For each catalog size: synthetic items prepared and tokenised once, then
- ``encode``: a fresh process builds the item tower (``model=small``: the pretrained MiniLM,
  frozen) and runs the encoder over the catalog, as every worker did;
- ``write``: the driver's step (:func:`frozen_text_once`), once;
- ``map``: two fresh processes at once build the same tower and map the file, touch every row,
  and report the time and, from ``/proc/self/smaps`` once both have mapped it (a barrier of
  files), the file mapping's resident, private and proportional (PSS) bytes: shared pages count
  half in each.
The two ways run in the same invocation; ratios are of the same run.

    python bench/frozen_text.py --items 20000 50000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(root: str, items: int):
    from hydra import compose, initialize_config_dir

    from jobs.runtime.config.schema import register

    register()
    overrides = [
        f"paths.root_dir={root}",
        "experiment=tiny",
        "model=small",
        "logger=none",
        "data.reader.num_users=200",
        f"data.reader.num_items={items}",
        "data.reader.max_len=20",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="pretrain", overrides=overrides)


def mapping_kib(path: str) -> dict[str, int]:
    """Rss, Private_* and Pss of this process's mappings of ``path`` (kB, from /proc/self/smaps)."""
    out = {"rss": 0, "private": 0, "pss": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.rstrip().endswith(path)
        elif inside and head:
            key = head[0].rstrip(":")
            if key == "Rss":
                out["rss"] += int(head[1])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["private"] += int(head[1])
            elif key == "Pss":
                out["pss"] += int(head[1])
    return out


def barrier(root: Path, name: str, n: int, timeout: float) -> None:
    """Wait (up to ``timeout`` s) until ``n`` processes have reached this point (a file each)."""
    import os

    (root / f"{name}-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout
    while len(list(root.glob(f"{name}-*"))) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/frozen_text.py: the other mapper did not reach '{name}' in {timeout:.0f} s")
        time.sleep(0.05)


def worker(root: str, items: int, mode: str, hold: float) -> None:
    """One process: build the tower as a training worker does, then get the catalog's encodings."""
    import torch

    from jobs.runtime.config.text_encodings import catalog_item_tower, frozen_text_once, install_frozen_text

    cfg = config(root, items)
    it = cfg.model.item_tower
    data_dir = Path(root) / "data" / "synthetic"
    tower = catalog_item_tower(cfg, "pretrain", data_dir)
    start = time.perf_counter()
    line: dict = {"mode": mode, "items": items}
    if mode == "encode":
        text = tower.encode_catalog_text()
        line["rows"] = text.shape[0]
    elif mode == "write":
        frozen_text_once(cfg, "pretrain", data_dir)
    else:
        path = install_frozen_text(tower, data_dir, it.tokenizer, it.max_text_tokens)
        assert path is not None
        line["rows"] = int(tower._frozen_text(torch.arange(items)).shape[0])  # every row touched
        line.update({f"map_{k}_kib": v for k, v in mapping_kib(str(path)).items()})
        line["file_kib"] = path.stat().st_size // 1024
        line["seconds"] = time.perf_counter() - start
        barrier(Path(root), "mapped", 2, hold)  # both mappers have mapped and touched the file
        line.update({f"map_{k}_kib_both": v for k, v in mapping_kib(str(path)).items()})
        barrier(Path(root), "read", 2, hold)  # neither exits before the other has read its smaps
    line.setdefault("seconds", time.perf_counter() - start)
    print(json.dumps(line), flush=True)


def spawn(root: str, items: int, mode: str, hold: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, __file__, "--worker", mode, "--root", root, "--items", str(items), "--hold", str(hold)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench/frozen_text.py: a worker failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[20_000])
    parser.add_argument("--out", default=str(ROOT / "docs" / "frozen_text.json"))
    parser.add_argument("--worker", choices=["encode", "write", "map"])
    parser.add_argument("--root")
    parser.add_argument("--hold", type=float, default=0.0)
    args = parser.parse_args()
    if args.worker:
        worker(args.root, args.items[0], args.worker, args.hold)
        return
    from jobs.runtime.config.assembly import prepare_data

    rows = []
    for items in args.items:
        with tempfile.TemporaryDirectory(prefix="frozen-text-") as root:
            prepare_data(config(root, items))  # the items and their tokens, once
            encode = result(spawn(root, items, "encode"))
            write = result(spawn(root, items, "write"))
            mappers = [spawn(root, items, "map", hold=120.0) for _ in range(2)]
            mapped = [result(p) for p in mappers]
            row = {"items": items, "encode_s": encode["seconds"], "write_s": write["seconds"], "map_s": [m["seconds"] for m in mapped], "mappers": mapped}
            row["ratio_encode_to_map"] = encode["seconds"] / max(m["seconds"] for m in mapped)
            rows.append(row)
            both = mapped[0]
            print(
                f"{items} items: a worker encoding the catalog {encode['seconds']:.2f} s; the driver once {write['seconds']:.2f} s; "
                f"each of 2 workers mapping it {max(row['map_s']):.3f} s ({row['ratio_encode_to_map']:.0f}x); file {both['file_kib']} KiB, "
                f"per mapper with both alive: resident {both['map_rss_kib_both']} KiB, private {both['map_private_kib_both']} KiB, PSS {both['map_pss_kib_both']} KiB",
                flush=True,
            )
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
