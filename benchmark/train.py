"""The training loop: one plain loop for every supervised model in the registry.

Inputs are float images (B, 1, 28, 28) in [0, 1]. Training uses the 55,000 fit images of the fixed split
(`Mnist.validation_split`); after every epoch the validation error is measured and shown, and the test set
is evaluated once, at the end, never consulted for any choice. `all_train` is the final refit once every
choice has been made on validation: all 60,000 training images, none held out, so no validation figure.
On the CPU the run is deterministic for a given seed (same seed, same threads: same weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmark.config import TrainConfig, recipe_changes
from benchmark.data import Mnist
from benchmark.errors import BenchError, first_line
from models import create_model, get_entry, parameter_count
from models.cowmask import smooth_noise


def resolve_config(model: str, **overrides) -> TrainConfig:
    """Defaults of TrainConfig, then the model's registered defaults, then non-None `overrides`; BenchError for an
    unknown option or a count or learning rate that is not positive."""
    known = {f.name for f in fields(TrainConfig)}
    merged = {**get_entry(model).train_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(merged) - known
    if unknown:
        raise BenchError(f"unknown training option(s) {sorted(unknown)} for model {model}")
    cfg = TrainConfig(**merged)
    for option, value in [("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--lr", cfg.lr),
                          ("--train-subset", cfg.train_subset), ("--labels", cfg.labels)]:
        if value is not None and not value > 0:
            raise BenchError(f"{option} {value}: expected a positive number")
    return cfg


def pick_device(device: str) -> torch.device:
    """`auto` takes CUDA when present; asking for `cuda` without it is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` images, n // 10 per class (the remainder to the lowest classes), drawn with `seed`."""
    rarest = np.bincount(labels, minlength=10).min()  # a balanced set takes about n / 10 of every digit
    if not 10 <= n <= 10 * rarest:
        raise BenchError(f"--labels {n}: expected between 10 and {10 * rarest} (the rarest digit has {rarest} fit "
                         f"images)")
    rng = np.random.default_rng(seed)
    picked = []
    for digit in range(10):
        pool = np.flatnonzero(labels == digit)
        picked.append(rng.choice(pool, n // 10 + (digit < n % 10), replace=False))
    return np.sort(np.concatenate(picked))


def random_distortion(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply an independent random rotation/scale/shear/shift, and elastic distortion if `cfg.elastic`, to
    each image of x (B, 1, 28, 28).

    Vectorised: one sampling grid for the whole batch, bilinear resampling, zeros outside. The elastic part
    (Simard et al. 2003) displaces every pixel by uniform noise in [-1, 1] smoothed with a Gaussian of
    `elastic_sigma` pixels and scaled by `elastic` pixels: strokes bend and thicken locally, the kind of
    variation between writers that an affine map cannot make.
    """
    b = x.shape[0]

    def uniform(*shape, limit):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * limit

    angle = uniform(b, limit=math.radians(cfg.max_rotation))
    scale = 1 + uniform(b, limit=cfg.max_scale)
    shear = uniform(b, limit=cfg.max_shear)
    shift = torch.stack([uniform(b, limit=cfg.max_shift), uniform(b, limit=cfg.max_shift)], dim=1) * (2 / 28)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if cfg.elastic > 0:  # no random draws otherwise, so affine-only runs keep their seeds' streams
        # noise drawn with a margin of `radius`, so the smoothing needs no padding (exact up to the edges)
        height, width = x.shape[2:]
        radius = max(1, round(3 * cfg.elastic_sigma))
        noise = uniform(2 * b, height + 2 * radius, width + 2 * radius, limit=1.0)
        displacement = smooth_noise(noise, torch.full((2 * b,), cfg.elastic_sigma), radius, padding=0)
        displacement = displacement.view(b, 2, height, width).permute(0, 2, 3, 1) * cfg.elastic
        grid = grid + (displacement * (2 / 28)).to(x)  # pixels -> grid units
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.inference_mode()
def predict_probs(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities (N, 10) float32 of `model` on float images (N, 1, 28, 28)."""
    model.eval()
    out = [F.softmax(model(images[i:i + batch_size].to(device)).float(), dim=1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float,
                  unlabelled: torch.Tensor | None = None, second_view: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own `training_loss` if it has one (unlabelled views passed only when given), else CE."""
    if hasattr(model, "training_loss"):
        extra = {} if unlabelled is None else {"unlabelled": unlabelled}
        if second_view is not None:
            extra["second_view"] = second_view
        return model.training_loss(x, y, label_smoothing, **extra)
    return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)


class ShuffledBatches:
    """Endless index batches: each pass over range(n) in a fresh random order from `gen` (its last batch may be
    short). Where it is in the current pass is part of a training checkpoint (`state_dict`), so a resumed run
    draws the same batches as one that was never stopped."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def __next__(self) -> torch.Tensor:
        if self.position >= len(self.order):  # the next pass, drawn only when the first batch of it is asked for
            self.order, self.position = torch.randperm(self.n, generator=self.gen), 0
        self.position += self.batch_size
        return self.order[self.position - self.batch_size:self.position]

    def state_dict(self) -> dict:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.position = state["order"], state["position"]


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: an interrupted save leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps: int):
    """Optimizer and a per-step LR scheduler. Weight decay skips biases and norm parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # a mean teacher's EMA copy is not
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        raise BenchError(f"optimizer {cfg.optimizer!r}: expected sgd or adamw")
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.2)
    elif cfg.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        raise BenchError(f"schedule {cfg.schedule!r}: expected onecycle or constant")
    return opt, sched


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]  # one row per epoch: epoch, loss, val_errors (None with all_train), seconds
    val_indices: np.ndarray  # (5000,), or empty with all_train
    val_probs: np.ndarray | None  # (5000, 10), None with all_train
    test_probs: np.ndarray  # (10000, 10)
    seconds: float
    parameters: int
    kept_epoch: int  # the epoch whose weights the model holds: the last, or the best on validation (keep_best)
    resumed_after: list[int]  # the epochs after which the training was stopped and resumed from a checkpoint


def train_model(name: str, cfg: TrainConfig, data: Mnist, seed: int, device: torch.device,
                show_progress: bool = True, teacher: nn.Module | None = None, checkpoint: Path | None = None,
                resume: bool = False) -> TrainResult:
    """Train registry model `name` with `cfg` on the fit split (all 60,000 images with `cfg.all_train`);
    returns the model and its probabilities.

    With a `checkpoint` path, everything the loop needs to go on (weights, optimizer and schedule, random
    states, where the batches are, the history) is saved there after every epoch; with `resume` a run
    stopped part-way continues from it and ends with the same weights as a run never stopped (CPU, same
    threads). A checkpoint made with another recipe or seed, or one found without `resume`, is a user error:
    it is never silently overwritten.

    With `cfg.labels` and a `teacher` (the model of run `cfg.teacher`, trained on the same labelled images),
    the model is a student (self-training, as Noisy Student, Xie et al. 2020): the labelled images keep their
    labels, every other fit image gets the teacher's probabilities on it (clean, unaugmented) as a soft target,
    and the student trains on all of them with its usual augmentation.
    """
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(seed)

    fit_idx, val_idx = data.validation_split()
    if cfg.all_train:
        if cfg.labels is not None or cfg.keep_best:
            raise BenchError("--all-train fits on all 60,000 labelled images and holds none out: it cannot be "
                             "combined with --labels or --keep-best (which selects on validation)")
        fit_idx, val_idx = np.concatenate([fit_idx, val_idx]), val_idx[:0]
    held_out = len(val_idx) > 0
    unlabelled_idx = None
    if cfg.labels is not None:
        labelled = balanced_subset(data.train_labels[fit_idx], cfg.labels, seed)
        unlabelled_idx = np.delete(fit_idx, labelled)  # the rest of the fit images, labels unused
        fit_idx = fit_idx[labelled]
    if cfg.train_subset is not None:  # smoke runs: cap both the labelled and the unlabelled pool
        fit_idx = fit_idx[:cfg.train_subset]
        unlabelled_idx = None if unlabelled_idx is None else unlabelled_idx[:cfg.train_subset]
    x_fit = to_float(data.train_images[fit_idx])
    y_fit = torch.from_numpy(data.train_labels[fit_idx])
    x_val, y_val = to_float(data.train_images[val_idx]), data.train_labels[val_idx]

    model = create_model(name, **cfg.model_kwargs).to(device)
    semi_supervised = getattr(model, "uses_unlabelled", False)
    if (teacher is None) != (cfg.teacher is None) or (teacher is not None and unlabelled_idx is None):
        raise BenchError("distillation needs both --teacher RUN and --labels N (the teacher's labelled images)")
    if teacher is not None:
        if hasattr(model, "training_loss"):  # cowmask, glimpse, generator: their losses take class labels
            raise BenchError(f"--teacher: model {name} has its own training loss; distil into a model trained "
                             f"by cross-entropy (cnn, mixer, softorder, mlp)")
        x_rest = to_float(data.train_images[unlabelled_idx])
        # soft targets, (N, 10): one-hot labels, then the teacher's probabilities; F.cross_entropy takes both
        y_fit = torch.cat([F.one_hot(y_fit.long(), 10).float(),
                           torch.from_numpy(predict_probs(teacher.to(device), x_rest, device))])
        x_fit = torch.cat([x_fit, x_rest])
    if semi_supervised and unlabelled_idx is None:
        raise BenchError(f"model {name} is semi-supervised: give --labels N (labelled images; the rest are unlabelled)")
    # a model may ask for a second, independently augmented view of the same unlabelled images
    second_view = semi_supervised and getattr(model, "second_view", False)
    if second_view and not cfg.augment:
        raise BenchError(f"model {name}: second_view needs augmentation (without it both views are the same image)")
    # the model may ask for a stronger distortion of the second view (FixMatch's weak and strong views)
    second_cfg = replace(cfg, **getattr(model, "second_view_distortion", {}))
    x_unlabelled = to_float(data.train_images[unlabelled_idx]) if semi_supervised else None
    channels_last = device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:  # oneDNN convolutions run ~1.5x faster in NHWC on the CPU
        model = model.to(memory_format=torch.channels_last)
    # An epoch is one pass over the labelled images, or over the unlabelled ones for a semi-supervised model.
    batches_per_epoch = math.ceil(len(x_unlabelled if semi_supervised else x_fit) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, cfg.epochs * batches_per_epoch)

    def prepare(x: torch.Tensor, distortion: TrainConfig = cfg) -> torch.Tensor:
        # to the device first: on a GPU the resampling runs there, not on the CPU that feeds it (the random
        # draws stay on the CPU generator, so a seed gives the same distortions on either device)
        x = x.to(device)
        if cfg.augment:
            x = random_distortion(x, distortion, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    labelled_batches = ShuffledBatches(len(x_fit), cfg.batch_size, gen)
    unlabelled_batches = ShuffledBatches(len(x_unlabelled), cfg.batch_size, gen) if semi_supervised else None
    history, seconds_before, resumed_after = [], 0.0, []
    kept_epoch, kept_state = cfg.epochs, None
    if checkpoint is not None and checkpoint.exists():
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say so, and leave it for the user to look at
            raise BenchError(f"{checkpoint} is not a readable checkpoint ({type(exc).__name__}): delete it to start "
                             f"over") from None
        try:
            done = f"{checkpoint} holds epoch {saved['history'][-1]['epoch']} of {saved['model']} seed {saved['seed']}"
            if not resume:
                raise BenchError(f"{done}: add --resume to continue it, or delete the file to start over")
            changes = recipe_changes(json.loads(saved["config"]), cfg)
            if saved["model"] != name or saved["seed"] != seed or changes:
                raise BenchError(f"{done}, trained with another recipe ({'; '.join(changes) or 'model or seed'}): "
                                 f"give the same options, or delete the file to start over")
            model.load_state_dict(saved["weights"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["schedule"])
            gen.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            labelled_batches.load_state_dict(saved["labelled_batches"])
            if semi_supervised:
                unlabelled_batches.load_state_dict(saved["unlabelled_batches"])
            if hasattr(model, "steps_taken"):  # schedules inside the model (exploration, ramp-ups) count steps
                model.steps_taken = saved["steps_taken"]
            history, kept_epoch, kept_state = saved["history"], saved["kept_epoch"], saved["kept_weights"]
            seconds_before, resumed_after = history[-1]["seconds"], saved["resumed_after"] + [len(saved["history"])]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # made by another version of the code
            raise BenchError(f"{checkpoint} cannot be resumed by this version of bench ({first_line(exc)}): delete it "
                             f"to start over") from None
    start = time.perf_counter() - seconds_before
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not show_progress)
    with progress:
        if resumed_after and show_progress:
            progress.console.print(f"resuming {name} after epoch {len(history)} of {cfg.epochs} from {checkpoint}")
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            task = progress.add_task(f"{name} epoch {epoch}/{cfg.epochs}", total=batches_per_epoch, status="")
            model.train()
            loss_sum = 0.0
            for step in range(batches_per_epoch):
                batch = next(labelled_batches)
                x, y = prepare(x_fit[batch]), y_fit[batch].to(device)
                xu = xu_second = None
                if semi_supervised:
                    raw = x_unlabelled[next(unlabelled_batches)]
                    xu = prepare(raw)
                    xu_second = prepare(raw, second_cfg) if second_view else None
                loss = training_loss(model, x, y, cfg.label_smoothing, xu, xu_second)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if hasattr(model, "after_step"):  # e.g. the mean teacher's moving average
                    model.after_step()
                loss_sum += loss.item()
                progress.update(task, advance=1, status=f"loss {loss_sum / (step + 1):.4f}")
            if not math.isfinite(loss_sum):
                raise BenchError(f"training diverged at epoch {epoch} (loss is not finite); lower --lr")
            if hasattr(model, "before_eval"):  # e.g. the mean teacher's batch-norm statistics, from clean images
                model.before_eval(x_unlabelled if semi_supervised else x_fit, device)
            val_errors = int((predict_probs(model, x_val, device).argmax(1) != y_val).sum()) if held_out else None
            history.append({"epoch": epoch, "steps": batches_per_epoch, "loss": loss_sum / batches_per_epoch,
                            "val_errors": val_errors,
                            "seconds": round(time.perf_counter() - start, 1)})
            if cfg.keep_best and (kept_state is None or val_errors <= history[kept_epoch - 1]["val_errors"]):
                kept_epoch, kept_state = epoch, copy.deepcopy(model.state_dict())
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "model": name, "seed": seed, "config": json.dumps(asdict(cfg), default=str),
                    "weights": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "labelled_batches": labelled_batches.state_dict(),
                    "unlabelled_batches": unlabelled_batches.state_dict() if semi_supervised else None,
                    "steps_taken": getattr(model, "steps_taken", None), "history": history,
                    "kept_epoch": kept_epoch, "kept_weights": kept_state, "resumed_after": resumed_after})
            summary = f"loss {loss_sum / batches_per_epoch:.4f}" + (f"  val errors {val_errors}/{len(val_idx)}"
                                                                    if held_out else "")
            progress.update(task, status=summary)
            if show_progress and not progress.console.is_terminal:  # logs get one line per epoch instead of bars
                progress.console.print(f"{name} epoch {epoch}/{cfg.epochs}: {summary}  {history[-1]['seconds']:.0f} s")
    seconds = time.perf_counter() - start
    if kept_state is not None:
        model.load_state_dict(kept_state)
    val_probs = predict_probs(model, x_val, device) if held_out else None
    test_probs = predict_probs(model, to_float(data.test_images), device)
    return TrainResult(model.to("cpu", memory_format=torch.contiguous_format), history, val_idx,
                       val_probs, test_probs, seconds, parameter_count(model), kept_epoch, resumed_after)
