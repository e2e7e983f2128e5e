"""Training throughput of the two towers at a model scale, with a given Lightning strategy.

Prints samples/s, tokens/s (user-sequence positions and item-text tokens), peak accelerator
memory and model FLOPs utilisation (FLOPs of one step counted by torch's FlopCounterMode,
divided by the step time and the device's peak). Needs torch, transformers and
pytorch-lightning (and deepspeed for --strategy deepspeed_stage_2); not Hydra or Ray, so it
runs on a bare GPU image. Synthetic data: random token ids and random histories.

  python bench/train_throughput.py --scale base --strategy ddp --steps 30
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

from datamodules.sequence_datamodule import collate_train
from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2
from lightning_modules.item_tower import ItemTower
from lightning_modules.retrieval_module import RetrievalModule
from lightning_modules.sampled_softmax import SampledSoftmaxLoss
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, vendor figures


class RandomHistories(Dataset):
    def __init__(self, num_items: int, seq_len: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(num_items, (size, seq_len + 1), generator=g).numpy()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def build(scale: str, num_items: int, text_tokens: int, seq_len: int, negatives: int) -> RetrievalModule:
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{scale}.yaml").read_text())
    it, ut = cfg["item_tower"], cfg["user_tower"]
    encoder = build_bert_encoder(None, 30522, it["hidden_size"], it["num_layers"], it["num_heads"], it["intermediate_size"], it.get("dropout", 0.1))
    ids = torch.randint(1000, 30522, (num_items, text_tokens))
    mask = torch.ones_like(ids)
    tower = ItemTower(num_items, cfg["dim"], encoder, ids, mask, freeze_encoder=False, dropout=it.get("dropout", 0.1))
    gpt = build_gpt2(ut["n_layer"], ut["n_head"], ut["n_embd"], max(seq_len, 8), ut.get("dropout", 0.1))
    model = TwoTowerModel(tower, UserTower(gpt, cfg["dim"]))
    loss = SampledSoftmaxLoss(torch.ones(num_items), num_negatives=negatives)
    return RetrievalModule(model, loss, lr=1e-4)


def step_flops(module: RetrievalModule, batch: dict, device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one forward + backward pass, counted by FlopCounterMode."""
    module = module.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        module.next_item_loss(batch).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="base")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "deepspeed_stage_2"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--num-items", type=int, default=20000)
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()

    on_gpu = args.device == "cuda"
    precision = "bf16-mixed" if on_gpu else "32-true"
    torch.manual_seed(0)
    module = build(args.scale, args.num_items, args.text_tokens, args.seq_len, args.negatives)
    params = sum(p.numel() for p in module.parameters())
    data = RandomHistories(args.num_items, args.seq_len, args.batch_size * (args.steps + args.warmup))
    loader = DataLoader(data, batch_size=args.batch_size, collate_fn=collate_train, num_workers=2 if on_gpu else 0)
    flops = step_flops(build(args.scale, args.num_items, args.text_tokens, args.seq_len, args.negatives), next(iter(loader)), torch.device(args.device), torch.bfloat16 if on_gpu else torch.float32)

    if args.strategy == "deepspeed_stage_2":
        from pytorch_lightning.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=2)
    else:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False) if on_gpu else "auto"
    timer = StepTimer(args.warmup)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1, strategy=strategy, precision=precision,
        max_steps=args.steps + args.warmup, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    step = sum(timer.times) / max(1, len(timer.times))
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    text_tokens = int((module.model.item_tower.attention_mask.sum(dim=1).float().mean().item()))
    result = {
        "device": name,
        "scale": args.scale,
        "strategy": args.strategy,
        "params_millions": round(params / 1e6, 1),
        "batch_size": args.batch_size,
        "step_seconds": round(step, 4),
        "samples_per_second": round(args.batch_size / step, 1),
        "sequence_tokens_per_second": round(args.batch_size * args.seq_len / step, 1),
        "text_tokens_per_item": text_tokens,
        "tflops_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step / 1e12, 1),
        "mfu": round(flops / step / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
