"""Training loop: AdamW + one-cycle, AMP on GPU, gradient clipping, atomic checkpoints with resume,
TensorBoard scalars, a log line every ``log_every`` steps (a progress bar too on a terminal), and DDP
when started by ``torchrun``."""

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

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.engine.build import load_weights
from voxsparse.engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from voxsparse.engine.distributed import DistInfo, convert_sync_batchnorm, mean_over_ranks
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.utils.io import remove_stale_temporaries
from voxsparse.utils.progress import progress

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
        adam_beta2: AdamW's second-moment decay (OpenPCDet's recipes use 0.99); the first moment
            cycles from 0.95 to 0.85 and back with the one-cycle schedule, as OpenPCDet's does.
        pct_start: fraction of steps spent warming up to ``lr``.
        div_factor: initial lr = lr / div_factor.
        grad_clip: max global gradient norm (0 disables clipping).
        amp: mixed precision (float16 autocast + loss scaling); "auto" enables it on CUDA only.
        sync_bn: under DDP, BatchNorm statistics over the global batch (torch's SyncBatchNorm on
            GPU, :class:`~voxsparse.engine.distributed.CpuSyncBatchNorm` on the CPU); without it
            each rank normalises by its own frames' statistics.
        checkpoint_every: write ``last.pth`` every this many epochs (and always at the end).
        log_every: steps between log lines (losses, lr, steps/s, ETA) and TensorBoard scalars.
        tensorboard: write TensorBoard scalars to ``<output_dir>/tensorboard``.
        seed: seeds model initialisation, sampling order and augmentation.
    """

    epochs: int = 20
    batch_size: int = 4
    num_workers: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
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
        # On CUDA one fused kernel updates every parameter: the per-tensor launches of the default
        # implementation cost more host time than the update's arithmetic.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2),
            fused=self.device.type == "cuda",
        )
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

    def resume(self, path: str | Path, allow_model_change: bool = False) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, loss scale and epoch count.

        With more epochs (or steps per epoch) than the checkpoint's run, the one-cycle schedule is
        rebuilt for the new total and continues from the checkpoint's step on it.

        Raises:
            CheckpointError: the file cannot be read or has no optimizer state.
            ValueError: the checkpoint's model config (layers, grid, classes) differs from this run's,
                unless ``allow_model_change``; or its weights do not fit the model.
        """
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.optimizer is None or ckpt.scheduler is None:
            raise CheckpointError(f"checkpoint {path}: has no optimizer/scheduler state, cannot resume training")
        theirs, ours = ckpt.config.get("model"), self.config_dict.get("model")
        if theirs is not None and ours is not None and theirs != ours:
            changed = _changed_keys(theirs, ours, "model")
            if not allow_model_change:
                raise ValueError(
                    f"checkpoint {path}: its model config differs from this run's in {len(changed)} key(s) "
                    f"({'; '.join(changed[:5])}); resume with the same model, or pass resume_allow_model_change=true"
                )
            log.warning("resuming %s with a changed model config: %s", path, "; ".join(changed))
        load_weights(self.model, ckpt.model, f"checkpoint {path}")
        self.optimizer.load_state_dict(ckpt.optimizer)
        old_total = ckpt.scheduler.get("total_steps")
        if old_total == self.total_steps:
            self.scheduler.load_state_dict(ckpt.scheduler)
        else:
            # The new schedule (built in __init__ for this run's total) taken from the saved step on:
            # its step count, then the lr and momentum it gives at that step.
            self.scheduler.last_epoch = ckpt.step - 1
            self.scheduler.step()
            log.info(
                "schedule rebuilt for %d steps (the checkpoint's run had %s); continuing from step %d",
                self.total_steps, old_total, ckpt.step,
            )
        if ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        self.epoch, self.step = ckpt.epoch, ckpt.step
        if self.info.is_main:
            for tmp in remove_stale_temporaries(self.checkpoint_path):
                log.info("removed %s, left by an interrupted checkpoint write", tmp)
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)
        if self.epoch >= self.cfg.epochs:
            log.warning(
                "the checkpoint has finished %d of %d epochs: nothing to train (trainer.epochs=N extends the run)",
                self.epoch, self.cfg.epochs,
            )

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
        bar = progress(
            self.loader, f"epoch {self.epoch + 1}/{self.cfg.epochs}", enabled=self.info.is_main, leave=False
        )
        steps_per_epoch = len(self.loader)
        window_start, window_step = time.perf_counter(), self.step
        for i, batch in enumerate(bar):
            batch = batch.to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                losses = self.ddp(batch.points, batch.annotations, self.reduce_counts)
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
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            self.scheduler.step()
            self.step += 1
            bar.set_postfix({short: f"{values[n]:.3f}" for n, short in _SHORT.items() if n in values}, refresh=False)
            if self.step % self.cfg.log_every == 0 or i + 1 == steps_per_epoch:
                now = time.perf_counter()
                rate = (self.step - window_step) / max(now - window_start, 1e-9)
                window_start, window_step = now, self.step
                if self.info.is_main:
                    self._log_step(i + 1, steps_per_epoch, values, lr, rate)
                if self.writer is not None:
                    for name, value in values.items():
                        self.writer.add_scalar(f"loss/{name}", value, self.step)
                    self.writer.add_scalar("lr", lr, self.step)

    def _log_step(self, index: int, steps_per_epoch: int, values: dict[str, float], lr: float, rate: float) -> None:
        """One line: where the run is, its losses, learning rate, speed and time to the end."""
        parts = ", ".join(f"{n} {v:.3f}" for n, v in values.items() if n != "total")
        remaining = (self.total_steps - self.step) / rate if rate > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if math.isfinite(remaining) else "?"
        log.info(
            "epoch %d/%d step %d/%d (%d/%d): loss %.4f (%s) | lr %.3e | %.2f steps/s | ETA %s",
            self.epoch + 1, self.cfg.epochs, self.step, self.total_steps, index, steps_per_epoch,
            values["total"], parts, lr, rate, eta,
        )


def _changed_keys(a: Any, b: Any, where: str) -> list[str]:
    """Dotted keys at which two plain configs differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _changed_keys(a.get(k), b.get(k), f"{where}.{k}")]
    return [] if a == b else [f"{where}: {a!r} in the checkpoint, {b!r} now"]
