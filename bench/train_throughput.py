"""Training throughput of the two towers at a model scale: a plain PyTorch loop (the baseline)
or a Lightning strategy (ddp, DeepSpeed ZeRO-2/3), with or without activation checkpointing.

Prints one JSON line: samples/s, tokens/s (user-sequence positions, and item-text tokens through
the BERT tower), peak accelerator memory and model FLOPs utilisation (the FLOPs of one step
counted by torch's FlopCounterMode in the first warm-up step, divided by the step time and the
device's peak; with activation checkpointing the count includes the recomputation).
``--profile`` writes a torch.profiler table of the top kernels of two steps (plain loop).

Imports only torch, transformers, pytorch-lightning, pyyaml (and deepspeed for its strategies)
and the project's lightning_modules (which import nothing else); DeepSpeed runs also take the
jobs' DeepSpeed JSON (jobs/runtime/training/deepspeed_json.py) and, on a CPU, jobs/runtime/training/cpu_deepspeed.py,
neither of which imports Ray or Hydra: it runs on a bare GPU image.
Synthetic data: random token ids, random histories of full length.

  python bench/train_throughput.py --scale base --strategy deepspeed_stage_2 --activation-checkpointing
  python bench/train_throughput.py --device cpu --model tiny --strategy plain --steps 2 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2
from lightning_modules.item_tower import ItemTower
from lightning_modules.negative_bank import NegativeBank
from lightning_modules.retrieval_module import RetrievalModule
from lightning_modules.sampled_softmax import SampledSoftmaxLoss
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, vendor figures
STRATEGIES = ("plain", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload")


class RandomHistories(Dataset):
    """Full-length random windows: ``items``, ``mask``, next-item ``targets`` (as collate_train makes)."""

    def __init__(self, num_items: int, seq_len: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(num_items, (size, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"items": row[:-1], "mask": torch.ones(len(row) - 1, dtype=torch.bool), "targets": row[1:]}


class EncodedItems:
    """Counts the item texts the BERT tower encodes (wraps ``ItemTower.encode_text``)."""

    def __init__(self, tower: ItemTower):
        self.count, original = 0, tower.encode_text

        def counted(idx: torch.Tensor) -> torch.Tensor:
            self.count += idx.numel()
            return original(idx)

        tower.encode_text = counted


class Timing:
    """Step times after ``warmup`` steps, FLOPs of the first step, items encoded per timed step."""

    def __init__(self, warmup: int, device: torch.device, encoded: EncodedItems):
        self.warmup, self.device, self.encoded = warmup, device, encoded
        self.times: list[float] = []
        self.flops = 0
        self.items_timed = 0
        self._counter: FlopCounterMode | None = None

    def start(self, step: int) -> None:
        if step == 0:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._sync()
        self._t, self._items = time.perf_counter(), self.encoded.count

    def end(self, step: int) -> None:
        self._sync()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
        if step >= self.warmup:
            self.times.append(time.perf_counter() - self._t)
            self.items_timed += self.encoded.count - self._items

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TimingCallback(pl.Callback):
    def __init__(self, timing: Timing):
        self.timing = timing

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timing.start(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timing.end(batch_idx)


def build(args: argparse.Namespace) -> RetrievalModule:
    """The two towers of conf/model/<scale>.yaml (a fresh BERT) over a synthetic catalog."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{args.scale}.yaml").read_text())
    it, ut = cfg["item_tower"], cfg["user_tower"]
    encoder = build_bert_encoder(None, 30522, it["hidden_size"], it["num_layers"], it["num_heads"], it["intermediate_size"], it.get("dropout", 0.1))
    ids = torch.randint(1000, 30522, (args.num_items, args.text_tokens))
    mask = torch.ones_like(ids)
    chunk = args.chunk_size if args.chunk_size == "auto" else int(args.chunk_size)
    tower = ItemTower(
        args.num_items,
        cfg["dim"],
        encoder,
        ids,
        mask,
        freeze_encoder=False,
        dropout=it.get("dropout", 0.1),
        chunk_size=chunk,
        static_width=args.static_width,
        compile_encoder=args.compile,
    )
    gpt = build_gpt2(ut["n_layer"], ut["n_head"], ut["n_embd"], max(args.seq_len, 8), ut.get("dropout", 0.1))
    model = TwoTowerModel(tower, UserTower(gpt, cfg["dim"]))
    if args.activation_checkpointing:
        model.enable_activation_checkpointing()
    loss = SampledSoftmaxLoss(torch.ones(args.num_items), num_negatives=args.negatives)
    bank = NegativeBank(args.bank_size or args.negatives, args.bank_refresh_steps) if args.bank_refresh_steps else None
    return RetrievalModule(model, loss, lr=1e-4, negative_bank=bank, shared_item_encoding=args.shared_encoding)


def plain_loop(module: RetrievalModule, loader: DataLoader, device: torch.device, dtype: torch.dtype, timing: Timing, steps: int, profile: Path | None) -> None:
    """The baseline: next_item_loss, autocast, AdamW (fused on CUDA), nothing else."""
    module = module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    batches = iter(loader)

    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.next_item_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(steps):
        timing.start(i)
        step()
        timing.end(i)
    if profile is not None:
        write_profile(step, device, profile)


def write_profile(step, device: torch.device, path: Path) -> None:
    """torch.profiler over two more steps: the top kernels by device time, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=20) + "\n")


def cpu_deepspeed_strategy(**kwargs):
    """Lightning's DeepSpeedStrategy on a CPU (smoke runs): the overrides Ray's CPU workers use."""
    from pytorch_lightning.strategies import DeepSpeedStrategy

    from jobs.runtime.training.cpu_deepspeed import CPUDeepSpeedMixin

    class CPUDeepSpeedStrategy(CPUDeepSpeedMixin, DeepSpeedStrategy):
        pass

    return CPUDeepSpeedStrategy(**kwargs)


def lightning_fit(module: RetrievalModule, loader: DataLoader, args: argparse.Namespace, timing: Timing) -> None:
    on_gpu = args.device == "cuda"
    if args.strategy.startswith("deepspeed"):
        from jobs.runtime.training.deepspeed_json import deepspeed_json

        stage = 2 if args.strategy == "deepspeed_stage_2" else 3
        offload = args.strategy.endswith("offload")
        # the jobs' DeepSpeed JSON (no gradient clipping: the plain loop does not clip either)
        config = deepspeed_json(stage, args.batch_size, bf16=on_gpu, offload_optimizer=offload, offload_parameters=offload)
        if on_gpu:
            from pytorch_lightning.strategies import DeepSpeedStrategy

            strategy = DeepSpeedStrategy(config=config)
        else:
            strategy = cpu_deepspeed_strategy(config=config, process_group_backend="gloo")
    else:
        from pytorch_lightning.strategies import DDPStrategy

        # no unused parameters: every trainable one gets a gradient (tests/unit/test_training_efficiency.py)
        strategy = DDPStrategy(find_unused_parameters=False, process_group_backend=None if on_gpu else "gloo")
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed" if on_gpu else "32-true",
        max_steps=args.steps + args.warmup,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TimingCallback(timing)],
        gradient_clip_val=None,
    )
    trainer.fit(module, train_dataloaders=loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", "--model", dest="scale", default="base", help="a file of conf/model/ (tiny, small, base, large)")
    ap.add_argument("--strategy", default="plain", choices=STRATEGIES)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--num-items", type=int, default=20000)
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--chunk-size", default="auto", help="items per BERT call: a number or 'auto'")
    ap.add_argument("--static-width", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the BERT tower (needs --static-width)")
    ap.add_argument("--bank-refresh-steps", type=int, default=0, help="bank of stale negatives: re-encoded every N steps (0 = off)")
    ap.add_argument("--bank-size", type=int, default=None)
    ap.add_argument("--shared-encoding", action="store_true", help="histories and scored items through BERT in one pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", type=Path, default=None, help="plain loop: write the top kernels of two steps here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.compile and not args.static_width:
        ap.error("--compile needs --static-width (static shapes)")

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a CPU takes half a minute for `large`
        module = build(args)
    encoded = EncodedItems(module.model.item_tower)
    params = sum(p.numel() for p in module.parameters())
    total = args.steps + args.warmup + (2 if args.profile else 0)
    loader = DataLoader(
        RandomHistories(args.num_items, args.seq_len, args.batch_size * total), batch_size=args.batch_size, num_workers=2 if on_gpu else 0, pin_memory=on_gpu
    )
    timing = Timing(args.warmup, device, encoded)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    if args.strategy == "plain":
        plain_loop(module, loader, device, torch.bfloat16 if on_gpu else torch.float32, timing, args.steps + args.warmup, args.profile)
    else:
        lightning_fit(module, loader, args, timing)
    step = sum(timing.times) / max(1, len(timing.times))
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    items_per_step = timing.items_timed / max(1, len(timing.times))
    result = {
        "device": name,
        "scale": args.scale,
        "strategy": args.strategy,
        "activation_checkpointing": args.activation_checkpointing,
        "chunk_size": module.model.item_tower.chunk_size_on(device),
        "bank_refresh_steps": args.bank_refresh_steps,
        "shared_encoding": args.shared_encoding,
        "params_millions": round(params / 1e6, 1),
        "batch_size": args.batch_size,
        "timed_steps": len(timing.times),
        "step_seconds": round(step, 4),
        "samples_per_second": round(args.batch_size / step, 1),
        "sequence_tokens_per_second": round(args.batch_size * args.seq_len / step, 1),
        "items_encoded_per_step": round(items_per_step, 1),
        "text_tokens_per_second": round(items_per_step * args.text_tokens / step, 1),
        "tflops_per_step": round(timing.flops / 1e12, 3),
        "flops_include_recompute": args.activation_checkpointing,
        "achieved_tflops": round(timing.flops / step / 1e12, 1),
        "mfu": round(timing.flops / step / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if on_gpu else None,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
