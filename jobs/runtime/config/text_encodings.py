"""A fully frozen text encoder's pooled output for every catalog item, computed once per prepared
dataset, catalog tokens and encoder weights into ``<data folder>/encodings/<key>/text.npy``, and
memory-mapped by every process that trains the item tower: no training worker runs the encoder
over the catalog at start-up, and the workers of a node read one copy from the page cache.

The key covers the tokens' folder (itself keyed by the prepared data, tokenizer and width), the
pooling and a digest of the encoder's weights, so a fine-tuning run from a bundle whose encoder
differs gets its own file. A Ray job's driver writes the file before any worker starts
(:func:`frozen_text_once`); a process that finds it missing (weights the driver could not know,
such as a sweep trial's) computes it itself, writing to a private file that is renamed into place,
so concurrent writers cannot leave a half-written one. A tower that is not fully frozen (trained
or partly unfrozen encoder) keeps computing what it needs, as before."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from jobs.runtime.config.catalog_tokens import catalog_tokens, tokens_folder
from jobs.runtime.tracking.console import say
from lightning_modules.item_tower import ItemTower

log = logging.getLogger(__name__)

FILE = "text.npy"


def frozen_text_wanted(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s item tower has a text encoder that is frozen whole (its output cacheable)."""
    it = cfg.model.item_tower
    return bool(it.use_text and it.freeze_encoder and not it.unfreeze_top_layers)


def encoder_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 of the encoder's state: every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encodings_path(data_dir: Path, tokenizer: str, max_tokens: int, tower: ItemTower) -> Path:
    tokens = tokens_folder(data_dir, tokenizer, max_tokens)
    assert tower.encoder is not None
    key = {"tokens": tokens.name, "pooling": tower.pooling, "encoder": encoder_digest(tower.encoder), "items": tower.num_items}
    return data_dir / "encodings" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] / FILE


def install_frozen_text(tower: ItemTower, data_dir: str | Path | None, tokenizer: str, max_tokens: int) -> Path | None:
    """Give a fully frozen ``tower`` its catalog encodings from ``data_dir``'s file, computing
    and writing the file first if it is missing; returns the file, or None (and changes nothing)
    when the tower has no fully frozen encoder or no prepared folder."""
    if data_dir is None or not tower.caches_frozen_text:
        return None
    path = encodings_path(Path(data_dir), tokenizer, max_tokens, tower)
    if not path.is_file():
        start = time.perf_counter()
        say("item tower: encoding %d item texts once with the frozen text encoder", tower.num_items)
        text = tower.encode_catalog_text().cpu().float().numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        writing = path.with_name(f"{FILE}.partial-{os.getpid()}.npy")
        np.save(writing, text)
        os.replace(writing, path)  # whole or not at all; a concurrent writer's file is identical
        log.info("item tower: encoded %d item texts once with the frozen encoder into %s (%.1f s)", tower.num_items, path, time.perf_counter() - start)
    text = np.load(path, mmap_mode="c")
    if text.ndim != 2 or text.shape[0] != tower.num_items:
        raise ValueError(f"{path}: encodings of shape {list(text.shape)}, but the catalog has {tower.num_items} items: remove the folder to encode again")
    tower.set_frozen_text(torch.from_numpy(text))
    log.info("item tower: frozen text encodings of %d items memory-mapped from %s", tower.num_items, path)
    return path


def catalog_item_tower(cfg: DictConfig, stage: str, data_dir: Path) -> ItemTower:
    """The stage's item tower built alone, as a worker builds it (same seed), from the prepared
    catalog's tokens (not the users), with the encoder weights of ``init_from`` when fine-tuning."""
    from inference.bundle import read_weights
    from jobs.runtime.config.assembly import build_item_tower

    it = cfg.model.item_tower
    torch.manual_seed(cfg.seed)  # as the workers' seed_everything: a randomly initialised encoder matches theirs
    token_ids, attention = catalog_tokens(data_dir, it.tokenizer, it.max_text_tokens)
    tower = build_item_tower(cfg, token_ids.shape[0], token_ids, attention)
    if stage == "finetune" and cfg.init_from:
        prefix = "item_tower.encoder."
        weights = {k[len(prefix) :]: v for k, v in read_weights(cfg.init_from).items() if k.startswith(prefix)}
        assert tower.encoder is not None
        tower.encoder.load_state_dict(weights)
    return tower


RAY_PASS_ITEMS = 200_000  # from this many items the driver's pass runs on Ray actors (below: one process, quicker than starting them)
PIECE_ITEMS = 65_536  # items per piece handed to an encoding actor


def frozen_text_once(cfg: DictConfig, stage: str, data_dir: Path, ray_pass_items: int = RAY_PASS_ITEMS) -> Path | None:
    """On a Ray job's driver, before the workers start: the encodings file of the stage's item
    tower (:func:`catalog_item_tower`) made (:func:`install_frozen_text`). None when the config
    has no fully frozen encoder. The workers build the same tower (same seed and weights) and find the file.
    A catalog of ``ray_pass_items`` items or more is encoded by a Ray Data actor pool across the
    cluster's nodes (:func:`encode_on_ray`) instead of by this process."""
    if not frozen_text_wanted(cfg):
        return None
    it = cfg.model.item_tower
    tower = catalog_item_tower(cfg, stage, data_dir)
    path = encodings_path(Path(data_dir), it.tokenizer, it.max_text_tokens, tower)
    if not path.is_file() and tower.num_items >= ray_pass_items:
        from jobs.runtime.config.ray_cluster import ray_session, train_needs

        with ray_session(cfg, train_needs(cfg)):  # fails at once, naming the shortfall, where the workers' resources are missing
            encode_on_ray(cfg, stage, Path(data_dir), path, tower.num_items, tower._text_encoder().config.hidden_size)
    return install_frozen_text(tower, data_dir, it.tokenizer, it.max_text_tokens)


class TextEncodingPart:
    """Ray Data actor: the stage's item tower built as the driver builds it (its key checked against
    the driver's, so the weights are the same), then per piece of item rows: their pooled encodings
    written into the shared file's rows (a memory-mapped ``.npy`` every actor opens read-write)."""

    def __init__(self, cfg: DictConfig, stage: str, data_dir: str, expected: str, writing: str, device: str):
        torch.set_grad_enabled(False)
        it = cfg.model.item_tower
        self.tower = catalog_item_tower(cfg, stage, Path(data_dir))
        got = encodings_path(Path(data_dir), it.tokenizer, it.max_text_tokens, self.tower)
        if str(got) != expected:
            raise RuntimeError(f"an encoding actor built an item tower whose encodings belong in {got}, not the driver's {expected}")
        self.tower.to(device)
        self.out = np.load(writing, mmap_mode="r+")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        self.out[start:stop] = self.tower.encode_catalog_text(start, stop).cpu().float().numpy()
        self.out.flush()
        import ray

        return {"rows": np.array([stop - start]), "node_id": np.array([ray.get_runtime_context().get_node_id()])}


def encode_on_ray(cfg: DictConfig, stage: str, data_dir: Path, path: Path, num_items: int, hidden: int) -> dict[str, int]:
    """Write ``path`` (the catalog's frozen text encodings, [num_items, hidden] float32) with a pool
    of ``hardware.num_workers`` Ray Data actors of the training workers' resources (free until the
    training starts), each encoding pieces of item rows into the one file on ``data_dir``'s storage,
    created here under a private name and renamed into place once every row is written. Runs
    inside a Ray session; returns the rows written per node."""
    import ray

    hw = cfg.hardware
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    writing = path.with_name(f"{FILE}.partial-{os.getpid()}.npy")
    np.lib.format.open_memmap(writing, mode="w+", dtype=np.float32, shape=(num_items, hidden)).flush()
    pieces = [{"start": a, "stop": min(a + PIECE_ITEMS, num_items)} for a in range(0, num_items, PIECE_ITEMS)]
    gpu = hw.accelerator == "gpu"
    say("item tower: encoding %d item texts once on %d Ray actors (%d pieces)", num_items, min(hw.num_workers, len(pieces)), len(pieces))
    try:
        out = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
            TextEncodingPart,
            fn_constructor_kwargs={
                "cfg": cfg,
                "stage": stage,
                "data_dir": str(data_dir),
                "expected": str(path),
                "writing": str(writing),
                "device": "cuda" if gpu else "cpu",
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(hw.num_workers, len(pieces))),
            num_cpus=hw.cpus_per_worker,
            num_gpus=1 if gpu else 0,
            batch_format="numpy",
        )
        got = out.take_all()
        by_node: dict[str, int] = {}
        for r in got:
            by_node[str(r["node_id"])] = by_node.get(str(r["node_id"]), 0) + int(r["rows"])
        if sum(by_node.values()) != num_items or len(got) != len(pieces):
            raise RuntimeError(f"{path}: the encoding actors wrote {sum(by_node.values())} of {num_items} rows")
        os.replace(writing, path)
    finally:
        writing.unlink(missing_ok=True)
    log.info("item tower: %d item texts encoded on Ray into %s (%.1f s; rows per node %s)", num_items, path, time.perf_counter() - start, by_node)
    return by_node
