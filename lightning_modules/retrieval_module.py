"""What the pretraining and fine-tuning LightningModules share: the next-item objective,
full-ranking validation and the optimiser."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler

from lightning_modules.negative_bank import NegativeBank
from lightning_modules.ranking_metrics import DEFAULT_KS, RankingAccumulator
from lightning_modules.sampled_softmax import SampledSoftmaxLoss, full_softmax_loss
from lightning_modules.sparse_adamw import SparseRowAdamW, clip_grad_norm_, has_sparse_grad
from lightning_modules.two_tower_model import TwoTowerModel

log = logging.getLogger(__name__)


class RetrievalModule(pl.LightningModule):
    """Trains a TwoTowerModel on next-item prediction; validates by full ranking of the catalog.

    ``sampled_loss`` None means a full softmax over the catalog (for small catalogs).
    ``train_positions``: 'all' predicts the next item at every position (causal),
    'last' only after each window's last item.
    ``negative_bank``: in training, the sampled negatives come from it (their text encoded
    without gradients, reused for a few steps) instead of fresh draws.
    ``shared_item_encoding``: in training, the histories' items and the scored items go through
    a trainable text encoder in one pass (their union) instead of two.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        sampled_loss: SampledSoftmaxLoss | None = None,
        lr: float = 1e-3,
        encoder_lr_scale: float = 0.1,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        train_positions: str = "all",
        ks: tuple[int, ...] = DEFAULT_KS,
        item_categories: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        negative_bank: NegativeBank | None = None,
        shared_item_encoding: bool = False,
    ):
        super().__init__()  # argument values are checked by the config schema, before any data is read
        self.model = model
        self.sampled_loss = sampled_loss
        self.lr = lr
        self.encoder_lr_scale = encoder_lr_scale
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.train_positions = train_positions
        self.ks = tuple(ks)
        self.item_categories = item_categories
        self.label_smoothing = label_smoothing
        self.negative_bank = negative_bank
        self.shared_item_encoding = shared_item_encoding
        self.val_history: list[dict[str, float]] = []  # one dict of val/* metrics per validation epoch
        self._val: RankingAccumulator | None = None
        self._catalog: torch.Tensor | None = None

    # ---- objective -------------------------------------------------------------------
    def next_item_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items, mask, targets = batch["items"], batch["mask"], batch["targets"]
        select: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # the predicted positions: (rows, columns) or a mask
        if self.train_positions == "last":
            rows = torch.arange(targets.shape[0], device=targets.device)
            select = (rows, mask.long().sum(dim=1) - 1)
        else:
            select = targets >= 0
        positives = targets[select]
        tower = self.model.item_tower
        shared = self.shared_item_encoding and self.training and tower.encoder is not None and not tower.encoder_frozen
        states = None if shared else self.model.user_states(items, mask)
        bank, sampled = None, None
        if self.training and self.sampled_loss is not None and self.negative_bank is not None:
            bank = self.negative_bank
            sampled = bank.draw(self.sampled_loss, tower, positives.device)
        if self.sampled_loss is not None:
            cand, labels, log_q = self.sampled_loss.candidates(positives, sampled=sampled)
        stale = bank is not None and bank.text is not None
        encoded = None  # (items, text encodings) computed once here, for every use below
        if shared or stale:
            # through the encoder with gradients: what is scored (with a bank: the positives only;
            # with a full softmax: the catalog), and the histories when shared with them
            scored = positives if stale else cand if self.sampled_loss is not None else torch.arange(tower.num_items, device=positives.device)
            fresh = torch.unique(torch.cat([items.reshape(-1), scored]) if shared else scored)
            encoded = (fresh, tower.encode_text(fresh))
        if shared:
            states = self.model.user_states(items, mask, encoded=encoded)
        assert states is not None  # computed above, or just now when shared
        users = states[select]
        if stale:
            assert bank is not None and encoded is not None  # stale: a bank with encodings, and the fresh ones computed above
            if shared:  # fresh encodings score the positives only, as without sharing: a negative
                # that is also a history item keeps the bank's (no encoder gradient through it)
                keep = torch.isin(encoded[0], positives)
                encoded = (encoded[0][keep], encoded[1][keep])
            encoded = bank.merge(encoded)
        if self.sampled_loss is None:
            logits = self.model.score(users, self.model.catalog_vectors_train(encoded=encoded))
            return full_softmax_loss(logits, positives, tower.cold if tower.has_cold else None, self.label_smoothing)
        return self.sampled_loss(self.model.score(users, self.model.item_vectors(cand, encoded=encoded)), labels, log_q)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.next_item_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["items"].shape[0])
        return loss

    # ---- validation: full ranking on the validation item, seen items removed -------------
    def on_validation_epoch_start(self) -> None:
        self._catalog = self.model.catalog_vectors()
        self._val = RankingAccumulator(self.model.item_tower.num_items, self.ks, self.item_categories)

    def _validation_state(self) -> tuple[torch.Tensor, RankingAccumulator]:
        """The catalog vectors and the metrics accumulator of the running validation epoch."""
        if self._catalog is None or self._val is None:
            raise RuntimeError("RetrievalModule: no validation epoch running (on_validation_epoch_start builds the catalog and the accumulator)")
        return self._catalog, self._val

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        catalog, val = self._validation_state()
        scores = self.model.score(self.model.user_vectors(batch["items"], batch["mask"]), catalog)
        val.update(scores, batch["targets"], batch["seen"], batch["users"])
        return scores

    def on_validation_epoch_end(self) -> None:
        _, val = self._validation_state()
        if self.trainer.world_size > 1:  # every rank ranked a shard of the users: gather them all
            val.merge_gathered(lambda t: self.all_gather(t.to(self.device)))
        metrics = val.compute()
        n = sum(r.numel() for r in val.ranks)
        for name, value in metrics.items():  # identical on every rank: no reduction needed
            self.log(f"val/{name}", value, prog_bar=name == "ndcg@10", batch_size=n)
        if not self.trainer.sanity_checking:
            self.val_history.append({f"val/{k}": v for k, v in metrics.items()} | {"epoch": float(self.current_epoch)})
            shown = ("ndcg@10", "recall@10", "mrr@10", "coverage@10")
            log.info("epoch %d: %s", self.current_epoch, "  ".join(f"val/{k} {metrics[k]:.4f}" for k in shown if k in metrics))
        self._val, self._catalog = None, None

    # ---- optimiser -----------------------------------------------------------------------
    def _on_cuda(self) -> bool:
        """Training on a CUDA device (the strategy's, when attached to a trainer: DeepSpeed
        builds the optimiser before it moves the model there)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        return device.type == "cuda"

    def configure_optimizers(self) -> OptimizerLRScheduler:
        encoder = self.model.item_tower.encoder
        encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim >= 2 and "embedding" not in name and "wpe" not in name
            groups.setdefault((id(p) in encoder_ids, decay), []).append(p)
        param_groups = [
            {"params": ps, "lr": self.lr * (self.encoder_lr_scale if is_enc else 1.0), "weight_decay": self.weight_decay if decay else 0.0}
            for (is_enc, decay), ps in sorted(groups.items())
        ]
        sparse = any(isinstance(m, torch.nn.Embedding) and m.sparse for m in self.modules())
        adamw = SparseRowAdamW if sparse else torch.optim.AdamW  # a sparse id table: only its step's rows
        optimizer = adamw(param_groups, lr=self.lr, fused=self._on_cuda() or None)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.lr_schedule == "cosine" else 0
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if total:
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, or with sparse gradients (a sparse id table) the same L2 norm
        clipping over their rows: torch's ``clip_grad_norm_`` refuses sparse gradients."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_val and has_sparse_grad(params):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient clipping by {gradient_clip_algorithm!r} does not take sparse gradients (model.item_tower.sparse_ids); use 'norm'")
            clip_grad_norm_(params, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
