"""`trustseg train`: the training loop, validation through the one ``evaluate()``, resumable checkpoints.

Everything random is a pure function of the config's seed and the step: the data order (see
``sampling``), the augmentation of each sample (``TransformedDataset``: seed, epoch, index) and the
global RNG, reseeded before every step (dropout, drop path). ``last.pt`` carries the model, the
optimizer, the step, the elapsed time and the history; resuming from it continues the exact same
sequence of updates, so an interrupted run ends with the weights of an uninterrupted one.

Under ``torchrun`` the same function runs data-parallel (DDP: NCCL on CUDA, gloo on CPU): ``batch_size``
is the global batch, each process takes a strided share of it, and only rank 0 writes files and draws
the bar. ``device`` places the model, batches, loss and validation metrics; autocast follows its type
(bf16 anywhere, fp16 on CUDA with a gradient scaler whose state travels in ``last.pt``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich import get_console
from rich.progress import TextColumn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.data.transforms import collate
from trustseg.engine.devices import autocast, loader_options, resolve_device, to_device
from trustseg.engine.distributed import init_from_environment, is_distributed, is_main_process, rank, world_size
from trustseg.errors import UserError
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, Predictor
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.models.factory import build_model
from trustseg.report.pages import write_run_report
from trustseg.engine.progress import make_progress
from trustseg.engine.rundir import RunDir, to_plain
from trustseg.training.asg import GuidedSegmenter, guidance_weight
from trustseg.training.config import TrainConfig
from trustseg.training.distill import distillation_loss, load_teacher
from trustseg.training.data import TrainData, compute_class_weights, load_train_data
from trustseg.training.history import History
from trustseg.training.initial_weights import WEIGHTS_JSON, load_initial_weights
from trustseg.training.losses import segmentation_loss
from trustseg.training.optim import build_optimizer, set_lr
from trustseg.training.sampling import EpochBatches, MultiScaleBatches, step_seed
from trustseg.training.schedule import lr_factor
from trustseg.training.state import check_resumable, load_resume_checkpoint, restore_rng, rng_state

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class TrainResult:
    """What a finished run produced; ``metrics`` is metrics.json: the final validation metrics (flat keys
    and ``per_class``) plus ``best_mIoU``, ``best_step``, ``step``, ``elapsed_s``, ``class_names``."""

    run_dir: Path
    metrics: dict[str, Any]
    best_miou: float
    best_step: int
    step: int
    elapsed_s: float
    stopped_by: str  # "steps" or "time_budget"


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``config.model`` on ``config.data``, writing the run directory ``config.out``.

    ``resume=True`` continues from ``OUT/last.pt`` (written by an interrupted run with the same config).
    Raises ``UserError`` for bad configs or data, and when the loss or gradient becomes NaN/inf (the last
    good ``last.pt`` is kept).
    """
    device = resolve_device(config.device)
    init_from_environment(device)
    if config.batch_size % world_size():
        raise UserError(f"batch_size={config.batch_size} (global) is not divisible by {world_size()} processes")
    out = Path(config.out)
    checkpoint = load_resume_checkpoint(out / LAST) if resume else None
    if not resume and (out / LAST).exists():
        raise UserError(f"{out} already holds a training run ({LAST}); pass --resume to continue it "
                        "or use another --out")
    return _Run(config, checkpoint, device, progress=progress).run()


class _Run:
    """One training session (fresh or resumed): owns the model, optimizer, data and counters."""

    def __init__(self, config: TrainConfig, checkpoint: Checkpoint | None, device: torch.device, *,
                 progress: bool) -> None:
        self.config = config
        self.device = device
        autocast(self.device, bf16=config.bf16, fp16=config.fp16)  # refuses fp16 off CUDA before any work
        self.out = Path(config.out)
        self.main = is_main_process()
        self.progress = progress and self.main
        self.run_dir = RunDir(self.out) if self.main else None
        self.data: TrainData = load_train_data(config)
        self.classes = self.data.classes
        self.steps_per_epoch = len(self.data.train) // config.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the train set has {len(self.data.train)} samples, "
                            f"fewer than batch_size={config.batch_size}")
        self.total_steps = config.steps or (config.epochs * self.steps_per_epoch if config.epochs else None)
        self.budget_s = None if config.time_budget_min is None else config.time_budget_min * 60.0

        torch.manual_seed(config.seed)
        self.model = build_model(config.model.name, num_classes=self.classes.num_classes, **config.model.options)
        initial_weights = load_initial_weights(self.model, config.model) if checkpoint is None else None
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        _check_crop(config, int(getattr(self.model, "size_divisor", 1)))
        # built after the model, so the model's initial weights do not depend on ASG being on
        self.guided = GuidedSegmenter(self.model, config.asg).to(self.device) if config.asg.enabled else None
        self.teacher = None if config.distill.teacher is None else load_teacher(
            config.distill.teacher, num_classes=self.classes.num_classes, mean=config.data.mean,
            std=config.data.std, device=self.device)
        self.optimizer = build_optimizer(self.model, config.optim, extra_groups=self._guidance_groups())
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.fp16)
        self.step, self.prior_elapsed_s, self.lr = 0, 0.0, 0.0
        history: list[dict[str, Any]] = []
        if checkpoint is not None:
            state = checkpoint.training_state
            check_resumable(config, checkpoint, train_size=len(self.data.train),
                            steps_per_epoch=self.steps_per_epoch)
            self.model.load_state_dict(checkpoint.state_dict)
            if self.guided is not None:
                self.guided.position_head.load_state_dict(state["asg_head"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            self.step, self.prior_elapsed_s = int(state["step"]), float(state["elapsed_s"])
            weights = state["class_weights"]
            self.class_weights = None if weights is None else weights.to(self.device)
            history = list(state["history"])
            restore_rng(state["rng"])
        else:
            self.class_weights = compute_class_weights(config.loss.class_weights, self.data.raw_train,
                                                       progress=self.progress, device=self.device)
        self.history = History(history, self.out if self.main else None)
        self.saved_step = self.step if checkpoint is not None else None
        self.final_metrics: dict[str, Any] | None = None
        self.final_metrics_step = -1
        self.trained = self.model if self.guided is None else self.guided
        if is_distributed():
            self.trained = DistributedDataParallel(
                self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.trained = torch.compile(self.trained)
        if self.main:
            self.run_dir.write_config(config)
            if initial_weights is not None:
                self.run_dir.write_json(WEIGHTS_JSON, initial_weights.to_json())
                get_console().print(initial_weights.summary())

    def _guidance_groups(self) -> list[dict[str, Any]]:
        """ASG's position head: its own AdamW group, without weight decay (as in the paper's code)."""
        if self.guided is None:
            return []
        named = list(self.guided.position_head.named_parameters(prefix="position_head"))
        return [{"params": [p for _, p in named], "names": [n for n, _ in named], "weight_decay": 0.0,
                 "lr_scale": 1.0}]

    # --- time and stopping -------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return self.prior_elapsed_s + time.perf_counter() - self.session_start

    def stop_reason(self) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "steps"
        if self.budget_s is not None:
            # Clocks differ between processes: rank 0 decides, so every process stops at the same step.
            over = torch.tensor([float(self.elapsed_s() >= self.budget_s)], device=self.device)
            if is_distributed():
                dist.broadcast(over, src=0)
            if over.item():
                return "time_budget"
        return None

    # --- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.session_start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            self.bar = None
            if self.progress:
                self.bar = stack.enter_context(
                    make_progress(TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                             "{task.fields[img_s]:.1f} img/s"))
                )
                self.task = self.bar.add_task("train", total=self.total_steps, completed=self.step,
                                              loss=math.nan, lr=0.0, img_s=0.0)
            stopped_by = self._train_until_stopped()
            if self.final_metrics is None or self.final_metrics_step != self.step:
                # A resumed run that had already finished is validated again, but not recorded twice.
                recorded = [r["step"] for r in self.history.of_kind("val")][-1:] == [self.step]
                self._validate(record=not recorded)
            metrics = self.final_metrics
        if self.saved_step != self.step:
            self._save(LAST)
        best_miou, best_step = self.history.best()
        metrics = {**metrics, "best_mIoU": best_miou, "best_step": best_step, "step": self.step,
                   "elapsed_s": self.elapsed_s(), "stopped_by": stopped_by, "world_size": world_size(),
                   "class_names": list(self.classes.names)}
        if self.main:
            self.run_dir.write_metrics(metrics)
            if self.config.report:
                write_run_report(self.out)
        return TrainResult(self.out, metrics, best_miou, best_step, self.step, self.elapsed_s(), stopped_by)

    def _train_until_stopped(self) -> str:
        self.trained.train()
        self.window = self._empty_window()
        while (reason := self.stop_reason()) is None:
            sampler = self._sampler()
            self.data.train.set_epoch(sampler.epoch)
            loader = DataLoader(self.data.train, batch_sampler=sampler, num_workers=self.config.data.num_workers,
                                collate_fn=collate, generator=torch.Generator(), **loader_options(self.device))
            self.tick = time.perf_counter()
            for batch in loader:
                batch = to_device(batch, self.device)
                self._train_step(batch["image"], batch["mask"])
                self._after_step()
                if (reason := self.stop_reason()) is not None:
                    return reason
        return reason

    def _sampler(self) -> EpochBatches | MultiScaleBatches:
        """The batches from the current step to the end of its epoch: fixed, or one crop scale per step."""
        config, length = self.config, len(self.data.train)
        common = {"seed": config.seed, "first_step": self.step, "rank": rank(), "world_size": world_size(),
                  "mixture": self.data.mixture}
        if config.data.crop_scales == (1.0,):
            return EpochBatches(length, config.batch_size, **common)
        try:
            return MultiScaleBatches(length, config.batch_size, crop=config.data.crop, scales=config.data.crop_scales,
                                     divisor=int(getattr(self.model, "size_divisor", 1)), **common)
        except ValueError as error:
            raise UserError(f"data.crop_scales={list(config.data.crop_scales)}: {error}") from None

    def _train_step(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        config = self.config
        factor = lr_factor(config.schedule, self.step, total_steps=self.total_steps, elapsed_s=self.elapsed_s(),
                           budget_s=self.budget_s)
        self.lr = config.optim.lr * factor
        set_lr(self.optimizer, self.lr)
        torch.manual_seed(step_seed(config.seed, self.step, rank()))
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, bf16=config.bf16, fp16=config.fp16):
            output = self.trained(images)
        logits = output if self.guided is None else output[0]
        loss = segmentation_loss(logits.float(), masks, ignore_index=self.classes.ignore_index,
                                 weight=self.class_weights, ohem_threshold=config.loss.ohem_threshold,
                                 ohem_min_kept=config.loss.ohem_min_kept)
        if self.guided is not None:
            _, position_loss, position_error = output
            weight = guidance_weight(config.asg, self.step)
            loss = loss + weight * position_loss
            self.window["asg_loss"] += float(position_loss.detach())
            self.window["asg_error_patches"] += float(position_error)
            self.window["asg_lambda"] = weight
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.device, bf16=config.bf16, fp16=config.fp16):
                teacher_logits = self.teacher(images)
            distill = distillation_loss(logits.float(), teacher_logits.float(), config.distill.temperature)
            loss = loss + config.distill.weight * distill
            self.window["distill_loss"] += float(distill.detach())
        value = loss.detach().clone()
        if is_distributed():  # every process must see the same value to stop together
            dist.all_reduce(value)
            value /= world_size()
        self._check_finite("loss", float(value))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, max_norm))
        if not self.scaler.is_enabled():  # with loss scaling an overflow skips the step and lowers the scale
            self._check_finite("gradient norm", grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.window["images"] += images.shape[0] * world_size()
        self.window["loss"] += float(value)
        self.window["grad_norm"] += grad_norm
        self.window["steps"] += 1

    def _check_finite(self, what: str, value: float) -> None:
        if math.isfinite(value):
            return
        kept = "no checkpoint was written yet"
        if self.saved_step is not None:
            kept = f"{self.out / LAST} (step {self.saved_step}) is kept"
        raise UserError(
            f"training stopped at step {self.step + 1}: {what} is {value} (lr {self.lr:.3g}); {kept}; "
            "try a lower optim.lr, optim.grad_clip or bf16=false"
        )

    def _after_step(self) -> None:
        config, now = self.config, time.perf_counter()
        self.window["time_s"] += now - self.tick
        if self.step % config.log_every == 0 or self.step == self.total_steps:
            self._log()
        if config.val_every and self.step % config.val_every == 0:
            self._validate()
            self._save(LAST)
        elif config.checkpoint_every and self.step % config.checkpoint_every == 0:
            self._save(LAST)
        self.tick = time.perf_counter()

    def _log(self) -> None:
        window = self.window
        steps = max(window["steps"], 1)
        record = {"kind": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                  "loss": window["loss"] / steps, "lr": self.lr, "grad_norm": window["grad_norm"] / steps,
                  "img_per_s": window["images"] / max(window["time_s"], 1e-9),
                  "elapsed_s": self.elapsed_s()}
        if self.guided is not None:  # this process's own batches (the loss above is the processes' mean)
            record.update({"asg_loss": window["asg_loss"] / steps, "asg_lambda": window["asg_lambda"],
                           "asg_error_patches": window["asg_error_patches"] / steps})
        if self.teacher is not None:
            record["distill_loss"] = window["distill_loss"] / steps
        self.history.append(record)
        if self.bar is not None:
            if self.total_steps is None and self.budget_s is not None:  # time budget: estimate the total
                seconds_per_step = window["time_s"] / steps
                left = max(self.budget_s - self.elapsed_s(), 0.0)
                self.bar.update(self.task, total=self.step + int(left / max(seconds_per_step, 1e-9)))
            self.bar.update(self.task, completed=self.step, loss=record["loss"], lr=self.lr,
                            img_s=record["img_per_s"])
        self.window = self._empty_window()

    def _empty_window(self) -> dict[str, float]:
        """Sums over the steps since the last history line."""
        window = {"loss": 0.0, "steps": 0, "images": 0, "grad_norm": 0.0, "time_s": 0.0}
        if self.guided is not None:
            window.update(asg_loss=0.0, asg_error_patches=0.0, asg_lambda=0.0)
        if self.teacher is not None:
            window["distill_loss"] = 0.0
        return window

    # --- validation and checkpoints ------------------------------------------------------------------

    def _validate(self, *, record: bool = True) -> dict[str, Any]:
        if is_distributed():
            # BatchNorm statistics drift apart per process; evaluate everywhere with rank 0's (the saved ones).
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        if self.bar is not None:
            self.bar.update(self.task, description="validate")
        self.model.eval()
        data = self.config.data
        mode = "whole" if data.val_crop is None else "slide"
        inference = InferenceConfig(mode=mode, crop=data.val_crop, stride=data.val_stride, bf16=self.config.bf16)
        predictor = Predictor(self.model, data.mean, data.std, inference).to(self.device)
        accumulators = [ConfusionMatrix(self.classes.num_classes, self.classes.ignore_index)]
        try:
            # no nested bar: rich allows one live display, the training bar
            metrics = evaluate(predictor, self.data.val, accumulators, batch_size=data.val_batch_size,
                               num_workers=data.num_workers, progress=False, device=self.device)
        finally:
            self.model.train()
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if record:
            self.history.append({"kind": "val", "step": self.step, **summary, "elapsed_s": self.elapsed_s()})
        if self.bar is not None:
            self.bar.update(self.task, description="train")
            shown = "  ".join(f"{k} {100 * v:.2f}" for k, v in summary.items())
            self.bar.console.print(f"step {self.step}: val {shown}")
        if self.history.best()[1] == self.step:
            self._save(BEST)
        self.final_metrics, self.final_metrics_step = metrics, self.step
        return metrics

    def _save(self, name: str) -> None:
        if not self.main:
            return
        state = {
            "step": self.step,
            "elapsed_s": self.elapsed_s(),
            "world_size": world_size(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "schedule": {"lr": self.lr, "total_steps": self.total_steps, "budget_s": self.budget_s},
            "data_order": {"seed": self.config.seed, "train_size": len(self.data.train),
                           "steps_per_epoch": self.steps_per_epoch, "epoch": self.step // self.steps_per_epoch,
                           "batch_in_epoch": self.step % self.steps_per_epoch},
            "class_weights": None if self.class_weights is None else self.class_weights.cpu(),
            "rng": rng_state(),
            "history": self.history.records,
        }
        if self.guided is not None:
            state["asg_head"] = {k: v.cpu() for k, v in self.guided.position_head.state_dict().items()}
        checkpoint = Checkpoint(
            model={"name": self.config.model.name, "options": dict(self.config.model.options)},
            state_dict={k: v.cpu() for k, v in self.model.state_dict().items()},
            classes=self.classes,
            mean=tuple(self.config.data.mean),
            std=tuple(self.config.data.std),
            train_config=to_plain(self.config),
            training_state=state,
        )
        save_checkpoint(checkpoint, self.out / name)
        if name == LAST:
            self.saved_step = self.step


def _check_crop(config: TrainConfig, divisor: int) -> None:
    """Training crops go to the model unpadded, so they must fit its stride; say which crop would."""
    height, width = config.data.crop
    if height % divisor or width % divisor:
        fits = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
        raise UserError(f"data.crop={list(config.data.crop)} is not a multiple of {config.model.name}'s input "
                        f"stride {divisor}; use e.g. data.crop={list(fits)}")
