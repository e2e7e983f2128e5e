"""Every experiment composes and instantiates; a wrong key or value fails before any compute."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method
from omegaconf import OmegaConf

from jobs.runtime.config.assembly import build_model, build_module
from jobs.runtime.config.schema import validate
from tests.conftest import CONF, compose_config


def full_message(err: pytest.ExceptionInfo) -> str:
    return f"{err.value} {err.value.__cause__}"


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


class FakeCatalog:
    """What build_model/build_module read from a datamodule, for a 5-item catalog."""

    num_items = 5
    data_dir = None  # not read from a prepared folder: build_model tokenises the texts itself
    item_texts = ["Toy Story (1995). Genres: Animation.", "Heat (1995). Genres: Action.", "a", "b", "c"]
    item_categories = [["Animation"], ["Action"], [], [], []]
    item_train_counts = [3.0, 1.0, 0.0, 2.0, 1.0]
    cold_mask = np.zeros(5, dtype=bool)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("job", ["pretrain", "finetune", "evaluate", "pipeline"])
def test_every_experiment_composes_and_instantiates(experiment, job, tmp_path):
    cfg = compose_config(job, [f"experiment={experiment}"], tmp_path)
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    reader = get_method(cfg.data.reader._target_)
    kwargs = {k: v for k, v in cfg.data.reader.items() if k != "_target_" and not OmegaConf.is_missing(cfg.data.reader, k)}
    inspect.signature(reader).bind_partial(**kwargs)  # the reader accepts its configured arguments
    if job == "pipeline":
        model = build_model(cfg, FakeCatalog())
        for stage in ("pretrain", "finetune"):
            build_module(cfg, stage, model, FakeCatalog())


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_model_presets_build(scale, tmp_path):
    cfg = compose_config("pipeline", [f"model={scale}", "experiment=tiny", f"model={scale}"], tmp_path)
    model = build_model(cfg, FakeCatalog())
    assert model.item_tower.all_vectors().shape == (5, cfg.model.dim)


@pytest.mark.parametrize("scale,layers,width", [("base", 12, 768), ("large", 24, 1024)])
def test_large_presets_have_their_sizes(scale, layers, width, tmp_path):
    cfg = compose_config("pipeline", [f"model={scale}"], tmp_path)
    assert (cfg.model.user_tower.n_layer, cfg.model.user_tower.n_embd) == (layers, width)
    assert (cfg.model.item_tower.num_layers, cfg.model.item_tower.hidden_size) == (layers, width)
    validate(cfg)


def test_unknown_key_fails_naming_it(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("pretrain", ["model.dimm=3"], tmp_path)
    assert "dimm" in full_message(err)


def test_wrong_type_and_enum_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("pretrain", ["model.dim=big"], tmp_path)
    assert "model.dim" in full_message(err)
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("pretrain", ["finetune.loss.kind=hinge"], tmp_path)
    assert "finetune.loss.kind" in full_message(err)


def test_unknown_key_in_an_experiment_file_fails(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "broken.yaml").write_text("# @package _global_\ntrainer:\n  max_epoch: 3\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose(config_name="pretrain", overrides=["experiment=broken"])
    assert "max_epoch" in full_message(err)


@pytest.mark.parametrize(
    "job,override,key",
    [
        ("pretrain", "model.user_tower.n_head=3", "model.user_tower.n_head"),
        ("pretrain", "finetune.mlm_weight=0.5", "finetune.mlm_weight"),
        ("pretrain", "data.max_seq_len=0", "data.max_seq_len"),
        ("pretrain", "trainer.monitor=val/auc", "trainer.monitor"),
        ("pretrain", "model.temperature=0", "model.temperature"),
        ("pretrain", "trainer.ema_decay=1.5", "trainer.ema_decay"),
        ("pretrain", "trainer.ema_decay=0.99 strategy=deepspeed_stage_2", "trainer.ema_decay"),
        ("pretrain", "trainer.label_smoothing=1.0", "trainer.label_smoothing"),
        ("pretrain", "data.cold_start.num_items=-1", "data.cold_start.num_items"),
        ("pretrain", "model.item_tower.id_dropout=1.0", "model.item_tower.id_dropout"),
        ("pretrain", "finetune.loss.num_negatives=-1", "finetune.loss.num_negatives"),
        ("pretrain", "model.item_tower.chunk_size=0", "model.item_tower.chunk_size"),
        ("pretrain", "finetune.loss.bank_refresh_steps=-1", "finetune.loss.bank_refresh_steps"),
        ("pretrain", "finetune.loss.bank_size=0", "finetune.loss.bank_size"),
        ("pretrain", "pretrain.loss.bank_refresh_steps=5", "pretrain.loss.bank_refresh_steps"),
        ("pretrain", "model.item_tower.chunk_size=big", "model.item_tower.chunk_size"),
        ("pretrain", "model.item_tower.compile=true", "model.item_tower.compile"),
        ("pretrain", "model.item_tower.sparse_ids=sometimes", "model.item_tower.sparse_ids"),
        ("pretrain", "model.item_tower.sparse_ids=true strategy=deepspeed_stage_2", "model.item_tower.sparse_ids"),
        ("pretrain", "model.item_tower.sparse_ids=true model.item_tower.use_id_embedding=false", "model.item_tower.sparse_ids"),
        ("pretrain", "data=ml100k data.reader.sources=[{kind:ftp,url:x,md5:y}]", "data.reader.sources[0]"),
        ("pretrain", "data=ml100k data.reader.sources=[{kind:grouplens_zip,url:x}]", "data.reader.sources[0]"),
        ("pipeline", "infer.top_k=0", "infer.top_k"),
        ("pipeline", "infer.index.nprobe=0", "infer.index.nprobe"),
        ("pipeline", "infer.index.hnsw_m=1", "infer.index.hnsw_m"),
        ("pipeline", "infer.num_actors=0", "infer.num_actors"),
        ("batch_infer", "checkpoint=null", "checkpoint"),
        ("evaluate", "checkpoint=null", "checkpoint"),
        ("serve", "serve.port=70000", "serve.port"),
        ("serve", "serve.reason_template=no-slot", "serve.reason_template"),
        ("serve", "serve.update.every_events=0", "serve.update.every_events"),
        ("serve", "serve.update.every_events=10 serve.backend=ray", "serve.update"),
        ("update", "update.replay_fraction=1.5", "update.replay_fraction"),
        ("replay", "replay.cutoff_quantile=1.0", "replay.cutoff_quantile"),
        ("replay", "replay.variants=[frozen,weekly]", "replay.variants"),
        ("sweep", "sweep=tiny sweep.stage=evaluate", "sweep.stage"),
        ("sweep", "sweep=tiny sweep.mode=best", "sweep.mode"),
        ("sweep", "sweep=tiny sweep.metric=val/auc", "sweep.metric"),
    ],
)
def test_cross_field_checks_name_the_key(job, override, key, tmp_path):
    cfg = compose_config(job, override.split(), tmp_path)
    with pytest.raises(ValueError, match=f"config error at '{re.escape(key)}'"):
        validate(cfg)
    assert not (tmp_path / "data").exists()  # checked before any data is read


@pytest.mark.parametrize(
    "sweep,params,key",
    [
        ("tiny_optuna", {"finetune.lr": {"type": "grid", "values": [0.1]}}, "sweep.params.finetune.lr.type"),
        ("tiny", {"finetune.nothing": {"type": "choice", "values": [1]}}, "sweep.params.finetune.nothing"),
        ("tiny", {"seed": {"type": "uniform", "lower": 2, "upper": 1}}, "sweep.params.seed"),
        ("tiny", {"seed": {"type": "normal", "lower": 0, "upper": 1}}, "sweep.params.seed.type"),
        ("tiny", {}, "sweep.params"),
    ],
)
def test_sweep_params_are_checked_before_ray_starts(sweep, params, key, tmp_path):
    cfg = compose_config("sweep", [f"sweep={sweep}"], tmp_path)
    validate(cfg)  # the shipped sweep is valid
    cfg.sweep.params = params
    with pytest.raises(ValueError, match=f"config error at '{re.escape(key)}'"):
        validate(cfg)


def test_output_dir_is_per_job_and_time(tmp_path):
    cfg = compose_config("finetune", ["experiment=tiny"], tmp_path)
    out = Path(cfg.paths.output_dir)
    assert out.parts[-3] == "finetune" and str(out).startswith(str(tmp_path))


def test_a_missing_run_reference_fails_on_the_driver_before_ray_starts(tmp_path, monkeypatch):
    from jobs.runtime.training import ray_fit
    from jobs.runtime.training.stage_job import run_stage_job

    def no_ray(*args, **kwargs):  # the job must fail before it starts or joins Ray (another test's Ray may be up)
        raise AssertionError("the job entered a Ray session")

    monkeypatch.setattr(ray_fit, "ray_session", no_ray)
    cfg = compose_config("finetune", ["experiment=tiny", "launcher=ray", "logger=none", "init_from=latest"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no finished 'pretrain' run of experiment 'tiny'"):
        run_stage_job(cfg, "finetune")
    cfg = compose_config("finetune", ["experiment=tiny", "launcher=ray", "logger=none", f"init_from={tmp_path}/nowhere"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config error at 'init_from'.*nowhere"):
        run_stage_job(cfg, "finetune")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()
