"""Training loop: AdamW + one-cycle, AMP on GPU, gradient clipping, atomic checkpoints with resume,
TensorBoard scalars, progress bars, and DDP when started by ``torchrun``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from voxsparse.engine.distributed import DistInfo, convert_sync_batchnorm, mean_over_ranks
from voxsparse.models.detectors.sparse_detector import SparseDetector

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Optimisation settings (``configs/trainer/*.yaml``).

    Attributes:
        epochs: passes over the training set.
        batch_size: frames per step *per process*.
        num_workers: data-loading processes per training process.
        lr: peak learning rate of the one-cycle schedule.
        weight_decay: AdamW weight decay.
        pct_start: fraction of steps spent warming up to ``lr``.
        div_factor: initial lr = lr / div_factor.
        grad_clip: max global gradient norm (0 disables clipping).
        amp: mixed precision (float16 autocast + loss scaling); "auto" enables it on CUDA only.
        sync_bn: under DDP, BatchNorm statistics over the global batch (torch's SyncBatchNorm on
            GPU, :class:`~voxsparse.engine.distributed.CpuSyncBatchNorm` on the CPU); without it
            each rank normalises by its own frames' statistics.
        checkpoint_every: write ``last.pth`` every this many epochs (and always at the end).
        log_every: steps between TensorBoard scalars.
        tensorboard: write TensorBoard scalars to ``<output_dir>/tensorboard``.
        seed: seeds model initialisation, sampling order and augmentation.
    """

    epochs: int = 20
    batch_size: int = 4
    num_workers: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    pct_start: float = 0.4
    div_factor: float = 10.0
    grad_clip: float = 10.0
    amp: bool | str = "auto"
    sync_bn: bool = False
    checkpoint_every: int = 1
    log_every: int = 20
    tensorboard: bool = True
    seed: int = 0


#: Loss terms shown on the progress bar, by their short names.
_SHORT = {"total": "loss", "heatmap": "hm", "keypoint": "kp"}


class Trainer:
    """Fits a :class:`SparseDetector` on a :class:`DetectionDataset`.

    Only rank 0 logs, writes TensorBoard scalars and checkpoints; every rank trains. Under DDP the
    loss normalisers (counts of positives) are averaged over ranks, so with ``sync_bn`` a step of W
    processes with ``batch_size`` frames each equals a step of one process with W * ``batch_size``
    frames; logged losses are those of the global batch.
    """

    def __init__(
        self,
        model: SparseDetector,
        train_set: DetectionDataset,
        cfg: TrainerConfig,
        output_dir: str | Path,
        dist_info: DistInfo,
        config_dict: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.info = dist_info
        self.device = dist_info.device
        self.output_dir = Path(output_dir)
        self.config_dict = config_dict
        self.train_set = train_set
        self.model = model.to(self.device)
        if dist_info.enabled:
            if cfg.sync_bn:
                self.model = convert_sync_batchnorm(self.model, self.device)
            ids = [dist_info.local_rank] if self.device.type == "cuda" else None
            self.ddp: torch.nn.Module = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model
        self.reduce_counts = mean_over_ranks if dist_info.enabled else None
        self.sampler = DistributedSampler(
            train_set, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=cfg.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
            collate_fn=collate, drop_last=True, pin_memory=self.device.type == "cuda",
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"training set of {len(train_set)} frames is too small for batch_size={cfg.batch_size} "
                f"x {dist_info.world_size} process(es)"
            )
        self.total_steps = cfg.epochs * len(self.loader)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=self.total_steps, pct_start=cfg.pct_start,
            div_factor=cfg.div_factor,
        )
        self.use_amp = self.device.type == "cuda" if cfg.amp == "auto" else bool(cfg.amp)
        if self.use_amp and self.device.type != "cuda":
            raise ValueError("trainer.amp=true needs a CUDA device; use amp=auto or false on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch = 0
        self.step = 0
        self.writer = None
        if dist_info.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "last.pth"

    def state(self) -> Checkpoint:
        return Checkpoint(
            model=self.model.state_dict(),
            epoch=self.epoch,
            step=self.step,
            config=self.config_dict,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
        )

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, loss scale and epoch count."""
        ckpt = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ckpt.model)
        if ckpt.optimizer is None or ckpt.scheduler is None:
            raise ValueError(f"checkpoint {path}: has no optimizer/scheduler state, cannot resume training")
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.epoch, self.step = ckpt.epoch, ckpt.step
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    def fit(self, stop_after: int | None = None) -> None:
        """Train from ``self.epoch`` to ``cfg.epochs``, or only up to epoch ``stop_after`` (the
        schedule still spans ``cfg.epochs``; a later :meth:`resume` continues it)."""
        start = time.time()
        last = self.cfg.epochs if stop_after is None else min(stop_after, self.cfg.epochs)
        while self.epoch < last:
            self._train_epoch()
            self.epoch += 1
            if self.info.is_main and (self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == last):
                save_checkpoint(self.state(), self.checkpoint_path)
        if self.info.is_main:
            log.info("trained to epoch %d in %.1f min", self.epoch, (time.time() - start) / 60)
            if self.writer is not None:
                self.writer.flush()

    def _train_epoch(self) -> None:
        self.ddp.train()
        self.sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        bar = tqdm(
            self.loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.info.is_main,
            dynamic_ncols=True, leave=False,
        )
        for batch in bar:
            batch = batch.to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                preds = self.ddp(batch.points)
            losses = self.model.head.loss(preds, batch.annotations, self.reduce_counts)
            # Every scalar term the head reports (detection's, plus e.g. keypoint and visibility).
            names = [f.name for f in fields(losses) if isinstance(getattr(losses, f.name), torch.Tensor)]
            terms = torch.stack([getattr(losses, n).detach() for n in names])
            if self.info.enabled:
                # With positives counted over all ranks, the mean of the ranks' losses is the global
                # batch's loss; and every rank stops on a non-finite one (none is left in backward).
                terms = mean_over_ranks(terms)
            values = dict(zip(names, terms.tolist()))
            loss = values["total"]
            if not math.isfinite(loss):
                frames = f"frames of rank {self.info.rank}: {batch.frame_ids}"
                raise FloatingPointError(f"non-finite loss at step {self.step} ({frames})")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses.total).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            bar.set_postfix({short: f"{values[n]:.3f}" for n, short in _SHORT.items() if n in values})
            if self.writer is not None and self.step % self.cfg.log_every == 0:
                for name, value in values.items():
                    self.writer.add_scalar(f"loss/{name}", value, self.step)
                self.writer.add_scalar("lr", self.scheduler.get_last_lr()[0], self.step)
        if self.info.is_main:
            parts = ", ".join(f"{n} {v:.3f}" for n, v in values.items() if n != "total")
            log.info(
                "epoch %d/%d: loss %.3f (%s), lr %.2e",
                self.epoch + 1, self.cfg.epochs, loss, parts, self.scheduler.get_last_lr()[0],
            )
