"""The model bundle on its own: a round trip that scores identically, and clear errors naming the
file for a newer format, a truncated or damaged file, and parts that disagree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from inference.bundle import CATALOG, MANIFEST, WEIGHTS, BundleError, Catalog, UserTable, load_bundle, read_weights, save_bundle
from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2
from lightning_modules.item_tower import ItemTower
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower
from tests.conftest import ROOT

N, D = 12, 16


def tiny_model(text: bool = True, pooling: str = "mean") -> TwoTowerModel:
    torch.manual_seed(0)
    encoder = ids = mask = None
    if text:
        encoder = build_bert_encoder(None, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, dropout=0.1)
        ids = torch.randint(5, 50, (N, 6))
        mask = torch.ones(N, 6, dtype=torch.long)
        mask[::2, 4:] = 0
    tower = ItemTower(N, D, encoder, ids, mask, pooling=pooling, freeze_encoder=False, dropout=0.1)
    tower.set_cold_items(torch.arange(N) == 3)
    user = UserTower(build_gpt2(n_layer=2, n_head=2, n_embd=8, max_positions=16, dropout=0.1), D)
    model = TwoTowerModel(tower, user, temperature=0.5)
    with torch.no_grad():  # weights unlike any fresh initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def catalog_for(model: TwoTowerModel) -> Catalog:
    tower = model.item_tower
    has_text = tower.encoder is not None
    return Catalog(
        item_ids=np.array([f"i{n}" for n in range(N)], dtype=object),
        titles=[f"Item {n}" for n in range(N)],
        texts=[f"text of item {n}" for n in range(N)],
        categories=[["a"] if n % 2 else ["a", "b"] for n in range(N)],
        train_counts=np.arange(N, dtype=np.float64),
        cold=(np.arange(N) == 3),
        token_ids=tower.token_ids.numpy() if has_text else None,
        attention_mask=tower.attention_mask.numpy() if has_text else None,
    )


USERS = UserTable(np.array(["u0", "u1", "u2"], dtype=object), [np.array([0, 1, 2]), np.array([5]), np.array([7, 8, 9, 10, 11])])


def write(tmp_path: Path, model: TwoTowerModel | None = None, name: str = "bundle") -> tuple[Path, TwoTowerModel]:
    model = model or tiny_model()
    path = save_bundle(tmp_path / name, model, catalog_for(model), USERS, {"seed": 0}, max_seq_len=5, stage="finetune", metrics={"val/ndcg@10": 0.5})
    return path, model


def scores(model: TwoTowerModel) -> torch.Tensor:
    items = torch.tensor([[0, 1, 2, 0], [5, 7, 3, 9]])
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    with torch.no_grad():
        return model.score(model.user_vectors(items, mask), model.catalog_vectors())


@pytest.mark.parametrize("text,pooling", [(True, "mean"), (True, "cls"), (False, "mean")])
def test_round_trip_scores_exactly_like_the_saved_model(text, pooling, tmp_path):
    path, model = write(tmp_path, tiny_model(text, pooling))
    bundle = load_bundle(path)
    assert not bundle.model.training
    assert torch.equal(scores(bundle.model), scores(model))
    assert bundle.model.temperature == 0.5 and bundle.max_seq_len == 5 and bundle.model_version == 1
    assert list(bundle.catalog.item_ids) == [f"i{n}" for n in range(N)] and bundle.catalog.index_of("i7") == 7
    assert bundle.catalog.titles[4] == "Item 4" and bundle.catalog.categories[0] == ["a", "b"]
    np.testing.assert_array_equal(bundle.catalog.train_counts, np.arange(N))
    np.testing.assert_array_equal(bundle.catalog.cold, np.arange(N) == 3)
    assert bundle.model.item_tower.has_cold and bool(bundle.model.item_tower.cold[3])
    assert [h.tolist() for h in bundle.users.histories] == [[0, 1, 2], [5], [7, 8, 9, 10, 11]]
    assert bundle.users.index_of("u2") == 2 and bundle.users.index_of("nobody") is None
    assert bundle.manifest["metrics"] == {"val/ndcg@10": 0.5}
    if text:
        assert torch.equal(bundle.model.item_tower.token_ids, model.item_tower.token_ids)
        assert torch.equal(bundle.model.item_tower.attention_mask, model.item_tower.attention_mask)
    state = read_weights(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_loading_needs_no_hydra_ray_or_lightning(tmp_path):
    path, _ = write(tmp_path)
    code = (
        "import sys; from inference.bundle import load_bundle; b = load_bundle(sys.argv[1]); "
        "loaded = [m for m in ('hydra', 'ray', 'pytorch_lightning', 'omegaconf', 'datamodules', 'jobs') if m in sys.modules]; "
        "print(b.catalog.num_items, loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{N} []"


def test_a_newer_or_unknown_format_is_refused_naming_the_manifest(tmp_path):
    path, _ = write(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(BundleError, match=rf"{MANIFEST}.*format_version 99 is newer"):
        load_bundle(path)
    (path / MANIFEST).write_text(json.dumps(manifest | {"format": "something.else"}))
    with pytest.raises(BundleError, match=rf"{MANIFEST}.*'something.else'"):
        load_bundle(path)
    (path / MANIFEST).write_text(json.dumps(manifest)[:40])
    with pytest.raises(BundleError, match=rf"{MANIFEST}.*not valid JSON"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "elsewhere")


def test_a_manifest_naming_a_file_outside_the_bundle_is_refused(tmp_path):
    path, _ = write(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (tmp_path / "secret").write_text("not the bundle's")
    record = next(iter(manifest["files"].values()))
    for name in ("../secret", str(tmp_path / "secret")):
        (path / MANIFEST).write_text(json.dumps(manifest | {"files": {**manifest["files"], name: record}}))
        with pytest.raises(BundleError, match=rf"{MANIFEST}: lists the file '{name}', which is not inside the bundle"):
            load_bundle(path)


def test_a_truncated_or_damaged_file_is_named(tmp_path):
    path, _ = write(tmp_path)
    weights = path / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: is \d+ bytes, manifest.json says \d+"):
        load_bundle(path)
    with pytest.raises(BundleError, match=WEIGHTS):
        read_weights(path)
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: cannot read the weights"):
        load_bundle(path, verify=False)  # even unverified, a cut file fails clearly
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: sha256 does not match"):
        load_bundle(path)
    (path / CATALOG).unlink()
    weights.write_bytes(data)
    with pytest.raises(BundleError, match=rf"{CATALOG}: missing from the bundle"):
        load_bundle(path)


def _replace(path: Path, name: str, write_file) -> None:
    """Rewrite one file and record it in the manifest, as a bundle whose parts disagree would be."""
    write_file(path / name)
    from inference.bundle import _sha256

    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": _sha256(path / name)}
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_parts_that_disagree_are_named(tmp_path):
    path, _ = write(tmp_path, name="short_catalog")
    table = pq.read_table(path / CATALOG)
    _replace(path, CATALOG, lambda p: pq.write_table(table.slice(0, N - 1), p))
    with pytest.raises(BundleError, match=rf"{CATALOG}: has {N - 1} items; spec.json says {N}"):
        load_bundle(path)

    path, _ = write(tmp_path, name="other_weights")
    other, _ = write(tmp_path, tiny_model(text=False), name="id_only")
    _replace(path, WEIGHTS, lambda p: p.write_bytes((other / WEIGHTS).read_bytes()))
    with pytest.raises(BundleError, match=rf"{WEIGHTS}: the weights do not fit the architecture"):
        load_bundle(path)

    path, _ = write(tmp_path, name="bad_history")
    users = pq.read_table(path / "users.parquet").to_pydict()
    users["history"][1] = [N + 5]
    import pyarrow as pa

    _replace(path, "users.parquet", lambda p: pq.write_table(pa.table(users), p))
    with pytest.raises(BundleError, match=r"users.parquet: histories name item indices outside"):
        load_bundle(path)


def test_a_bundle_is_written_once_and_never_half(tmp_path):
    path, model = write(tmp_path)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(FileExistsError, match="written once"):
        write(tmp_path, model)
    assert sorted(p.name for p in path.iterdir()) == before

    class Exploding:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "half", model, catalog_for(model), USERS, {}, max_seq_len=5, stage="finetune", tokenizer=Exploding())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no half bundle, no temporary folder
