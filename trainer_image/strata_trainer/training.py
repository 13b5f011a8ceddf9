"""The training loop: frozen prefix, optional frozen-feature cache, per-epoch validation and pruning.

With the first k conv blocks frozen and a deterministic input pipeline, their output for each
image never changes, so it is computed once per trial (the feature cache) and every epoch only
runs the trainable rest of the network.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from strata_trainer.data import DatasetSplits, Split
from strata_trainer.features import SharedFeatureStore, tensor_digest
from strata.families.base import TrainingOptions
from strata_trainer.models import StagedModel

log = logging.getLogger(__name__)
EVAL_BATCH = 1024
CACHE_MEMORY_FRACTION = 0.5  # of the trial's memory limit, leaving room for the model and batches


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    epochs: list[EpochResult]
    best_epoch: int
    train_seconds: float
    feature_cache: str  # off | float32 | float16 | disk
    stopped_early: bool
    best_prefix_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    shared_features: str = ""  # "" (no shared store) | hit (read another trial's) | stored | private (store failed)
    best_model_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # kept for a test split

    @property
    def best(self) -> EpochResult:
        return self.epochs[self.best_epoch - 1]


class FeatureCache:
    """Frozen-prefix outputs for a split, in memory (float32 or float16) or in a disk memmap.

    With a shared store, a trial that reuses the same frozen weights on the same split as an earlier
    one reads its outputs instead of computing them (`shared` is then "hit", else "stored").
    """

    def __init__(self, model: StagedModel, k: int, split: Split, mode: str, device: torch.device, spill_dir: str | None,
                 shared: SharedFeatureStore | None = None, prefix_digest: str = ""):
        self.mode = mode
        self.shared = ""
        shape = (len(split.y), *model.arch.feature_shape(k))
        dtype = torch.float16 if mode in ("float16", "disk") else torch.float32
        np_dtype = np.dtype(np.float16 if dtype == torch.float16 else np.float32)
        self._file = None
        key, target = "", None
        if shared is not None:
            key = shared.key(prefix_digest, k, split.x, split.y, np_dtype.name)
            found = shared.load(key, shape, np_dtype, mmap=mode == "disk")
            if found is not None:
                self.shared = "hit"
                self._keep(found)
                return
            target = shared.new_file(key, shape, np_dtype)
        if target is not None:
            array = target[0]
        elif mode == "disk":
            self._file = tempfile.NamedTemporaryFile(dir=spill_dir, prefix="strata-features-", suffix=".f16")
            array = np.memmap(self._file.name, dtype=np.float16, mode="w+", shape=shape)
        else:
            array = torch.empty(shape, dtype=dtype)
        try:
            with torch.no_grad():
                for start in range(0, shape[0], EVAL_BATCH):
                    out = model.features(split.x[start:start + EVAL_BATCH].to(device), 0, k).cpu().to(dtype)
                    array[start:start + len(out)] = out if isinstance(array, torch.Tensor) else out.numpy()
        except BaseException:
            if target is not None:
                shared.discard(target[1])
            raise
        if target is not None and shared.commit(key, target[0], target[1]):
            self.shared = "stored"
        self._keep(array)

    def _keep(self, array: np.ndarray | torch.Tensor) -> None:
        if self.mode == "disk":
            self._array = array
        elif isinstance(array, torch.Tensor):
            self._tensor = array
        elif isinstance(array, np.memmap):
            self._tensor = torch.from_numpy(np.array(array))  # into memory, off the file
        else:
            self._tensor = torch.from_numpy(array)  # already read into memory: no second copy

    def take(self, index: torch.Tensor) -> torch.Tensor:
        if self.mode == "disk":
            return torch.from_numpy(np.asarray(self._array[index.numpy()])).float()
        return self._tensor[index].float()

    def __len__(self) -> int:
        return len(self._array) if self.mode == "disk" else len(self._tensor)


def choose_cache_mode(model: StagedModel, k: int, n_images: int, memory_limit: int | None) -> str:
    """float32 when it fits in the budget, float16 when half of it fits, else spill to disk."""
    per_image = math.prod(model.arch.feature_shape(k))
    needed = n_images * per_image * 4
    budget = int((memory_limit or _available_memory()) * CACHE_MEMORY_FRACTION)
    if needed <= budget:
        return "float32"
    if needed // 2 <= budget:
        return "float16"
    return "disk"


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2 << 30


def make_optimizer(options: TrainingOptions, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = options.learning_rate, options.weight_decay
    if options.optimizer == "sgd":
        momentum = 0.9 if options.momentum is None else options.momentum
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=options.nesterov and momentum > 0,
                               weight_decay=decay)
    if options.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=options.momentum or 0.0, weight_decay=decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def make_schedule(options: TrainingOptions, optimizer: torch.optim.Optimizer,
                  epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch: step decay at the milestones, or cosine annealing over the trial's epochs."""
    if options.schedule == "step" and options.milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(options.milestones), options.gamma)
    if options.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return None


def augment(x: torch.Tensor, options: TrainingOptions, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, per image, on the batch's device."""
    n, _, height, width = x.shape
    pad = options.random_crop_padding
    if pad:
        padded = nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if options.horizontal_flip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def evaluate(model: StagedModel, inputs: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, start: int,
             device: torch.device) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(y), EVAL_BATCH):
            index = torch.arange(begin, min(begin + EVAL_BATCH, len(y)))
            logits = model(inputs(index).to(device), start)
            target = y[index].to(device)
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
    return loss_sum / len(y), correct / len(y)


def train(
    model: StagedModel,
    data: DatasetSplits,
    *,
    frozen_layers: int,
    epochs: int,
    patience: int,
    seed: int,
    device: torch.device,
    cache_features: bool,
    memory_limit: int | None = None,
    spill_dir: str | None = None,
    report: Callable[[EpochResult], None] | None = None,
    shared_features: SharedFeatureStore | None = None,
    cache_info: dict[str, str] | None = None,
    keep_best: bool = False,
) -> TrainResult:
    """Train the trainable part; `report` may raise (e.g. optuna.TrialPruned) to stop the trial.

    `cache_info` receives the feature cache's mode and shared outcome before the first epoch, so a
    caller whose `report` stopped the training still knows them. `keep_best` keeps the best epoch's
    whole state (for evaluate_on_test) when the data has a test split. With augmentation the frozen
    prefix's outputs change every epoch, so they are not cached (the prefix still has no backward
    pass and no optimizer state).
    """
    arch = model.arch
    options = arch.training
    model.to(device)
    if frozen_layers:
        model.freeze_prefix(frozen_layers)
    optimizer = make_optimizer(options, model.trainable_parameters())
    schedule = make_schedule(options, optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    augmentation = torch.Generator().manual_seed(seed + 1)  # its own stream: shuffling is the same with or without

    started = time.perf_counter()
    mode = "off"
    shared_outcome = ""
    start = 0
    train_inputs: Callable[[torch.Tensor], torch.Tensor] = lambda index: data.train.x[index]
    val_inputs: Callable[[torch.Tensor], torch.Tensor] = lambda index: data.val.x[index]
    if frozen_layers and cache_features and not options.augments:
        mode = choose_cache_mode(model, frozen_layers, len(data.train.y) + len(data.val.y), memory_limit)
        digest = ""
        if shared_features is not None:
            state = model.prefix_state(frozen_layers)
            digest = tensor_digest(*(state[name] for name in sorted(state)),
                                   label=repr(arch.prefix_signature(frozen_layers)))
        train_cache = FeatureCache(model, frozen_layers, data.train, mode, device, spill_dir, shared_features, digest)
        val_cache = FeatureCache(model, frozen_layers, data.val, mode, device, spill_dir, shared_features, digest)
        if shared_features is not None:
            outcomes = {train_cache.shared, val_cache.shared}
            shared_outcome = "hit" if outcomes == {"hit"} else ("private" if "" in outcomes else "stored")
        train_inputs, val_inputs, start = train_cache.take, val_cache.take, frozen_layers

    if cache_info is not None:
        cache_info.update(feature_cache=mode, shared_features=shared_outcome)
    results: list[EpochResult] = []
    best_epoch, stopped_early, rising = 0, False, 0
    best_state: dict[str, torch.Tensor] = {}
    best_model: dict[str, torch.Tensor] = {}
    n = len(data.train.y)
    keep_best_model = keep_best and data.test is not None
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        loss_sum = 0.0
        for begin in range(0, n, options.batch_size):
            index = order[begin:begin + options.batch_size]
            x, target = train_inputs(index).to(device), data.train.y[index].to(device)
            if options.augments:
                x = augment(x, options, augmentation)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x, start), target)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(index)
        if schedule is not None:
            schedule.step()
        val_loss, val_accuracy = evaluate(model, val_inputs, data.val.y, start, device)
        result = EpochResult(epoch, loss_sum / n, val_loss, val_accuracy, time.perf_counter() - epoch_start)
        results.append(result)
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch} (learning rate too high?)")
        if best_epoch == 0 or val_loss < results[best_epoch - 1].val_loss:
            best_epoch, rising = epoch, 0
            best_state = model.prefix_state(model.depth)
            if keep_best_model:
                best_model = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            rising += 1
        if report is not None:
            report(result)
        if patience and rising >= patience and epoch < epochs:
            stopped_early = True
            break
    return TrainResult(results, best_epoch, time.perf_counter() - started, mode, stopped_early, best_state,
                       shared_outcome, best_model)


def evaluate_on_test(model: StagedModel, result: TrainResult, test: Split,
                     device: torch.device) -> tuple[float, float]:
    """(loss, accuracy) of the best epoch's weights on the test split: forward only, no cache."""
    model.load_state_dict(result.best_model_state)
    return evaluate(model, lambda index: test.x[index], test.y, 0, device)
