"""Distillation fine-tuning: the original model teaches the converted one.

Works with a user's own loader and optimizer, on cpu or cuda, with AMP where available,
and under ``torchrun`` with DistributedDataParallel: if a process group is initialized,
the student is wrapped in DDP (unless it already is) and metrics are averaged across
ranks. No processes are started here; that is the user's launcher's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import DepthwiseSeparableConv2d
from .progress import Progress


@dataclasses.dataclass
class EpochStats:
    """One epoch of distillation."""

    epoch: int
    loss: float
    seconds: float
    steps: int
    accuracy: float | None = None


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    feature_loss: float = 0.0,
    device: str | torch.device | None = None,
    amp: bool = False,
    eval_loader: Iterable | None = None,
    max_steps: int | None = None,
    progress: bool = False,
) -> list[EpochStats]:
    """Knowledge distillation from ``teacher`` to ``student``; returns the history.

    Loss per batch: ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T))`` plus, when the loader
    yields ``(inputs, labels)``, ``(1 − alpha) · cross-entropy(s, labels)``; with
    ``feature_loss > 0`` also that weight times the mean squared error between each
    replaced block's output and the matching teacher conv's output (matched by module
    name). The default optimizer is AdamW with a cosine schedule over all steps. The
    teacher is put in eval mode, never receives gradients and is never changed.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher_training = [(m, m.training) for m in teacher.modules()]
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(device)
    model = _maybe_ddp(student, device)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    steps_per_epoch = _len(loader)
    total_steps = min(max_steps or math.inf, steps_per_epoch * epochs if steps_per_epoch else math.inf)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = None
    if optimizer is None and math.isfinite(total_steps):
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    pairs = _feature_pairs(core, teacher) if feature_loss > 0 else []
    history: list[EpochStats] = []
    step = 0
    try:
        for epoch in range(epochs):
            model.train()
            start, loss_sum, count = time.perf_counter(), 0.0, 0
            # the steps this epoch will run: the epoch's length, or what --max-steps leaves of it
            this_epoch = min(steps_per_epoch or math.inf, (max_steps - step) if max_steps is not None else math.inf)
            total = int(this_epoch) if math.isfinite(this_epoch) else None
            with Progress(f"distilling epoch {epoch + 1}/{epochs}", total,
                          enabled=progress and _rank() == 0) as bar:
                for batch in loader:
                    if max_steps is not None and step >= max_steps:
                        break
                    x, y = _split(batch, device)
                    with _features(pairs) as feats, _autocast(device, amp):
                        with torch.no_grad():
                            t_out = teacher(x)
                        s_out = model(x)
                        loss = _kd_loss(s_out.float(), t_out.float(), y, temperature, alpha)
                        if pairs:
                            loss = loss + feature_loss * sum(
                                F.mse_loss(feats[("s", n)].float(), feats[("t", n)].float()) for n, _, _ in pairs
                            ) / len(pairs)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    if schedule is not None:
                        schedule.step()
                    loss_sum += float(loss.detach()) * x.shape[0]
                    count += x.shape[0]
                    step += 1
                    bar.advance(f"loss {loss_sum / max(count, 1):.4f}")
            mean_loss = _all_mean(loss_sum, count, device)
            accuracy = evaluate(core, eval_loader, device) if eval_loader is not None else None
            history.append(EpochStats(epoch + 1, mean_loss, time.perf_counter() - start, step, accuracy))
            if max_steps is not None and step >= max_steps:
                break
    finally:
        for p, flag in teacher_flags:
            p.requires_grad_(flag)
        for m, flag in teacher_training:
            m.training = flag
    return history


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy over ``(inputs, labels)`` batches (averaged across ranks under torchrun)."""
    device = torch.device(device or next(model.parameters()).device)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _split(batch, device)
                if y is None:
                    raise ValueError("evaluate needs (inputs, labels) batches")
                correct += int((model(x).argmax(1) == y).sum())
                total += y.shape[0]
    finally:
        for m, flag in flags:
            m.training = flag
    return _all_mean(float(correct), total, device)


def _kd_loss(student, teacher, labels, temperature: float, alpha: float) -> torch.Tensor:
    kd = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    if labels is None:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student, labels)


def _split(batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True) if len(batch) > 1 else None
        return x, y
    return batch.to(device, non_blocking=True), None


def _len(loader) -> int:
    try:
        return len(loader)
    except TypeError:
        return 0


def _maybe_ddp(student: nn.Module, device: torch.device) -> nn.Module:
    if not (dist.is_available() and dist.is_initialized()) or isinstance(student,
                                                                        nn.parallel.DistributedDataParallel):
        return student
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_mean(total: float, count: int, device) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / count if count else 0.0


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _feature_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, student block, teacher conv) for every replaced layer present in both models."""
    teacher_modules = dict(teacher.named_modules())
    return [(name, m, teacher_modules[name]) for name, m in student.named_modules()
            if isinstance(m, DepthwiseSeparableConv2d) and name in teacher_modules]


@contextlib.contextmanager
def _features(pairs: list[tuple[str, nn.Module, nn.Module]]):
    """Collect the outputs of the paired student blocks and teacher convs during one step."""
    feats: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for name, s_mod, t_mod in pairs:
        handles.append(s_mod.register_forward_hook(lambda m, a, out, name=name: feats.__setitem__(("s", name), out)))
        handles.append(t_mod.register_forward_hook(lambda m, a, out, name=name: feats.__setitem__(("t", name), out)))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def torchrun_group(device: str | torch.device | None = None):
    """Join the process group ``torchrun`` describes in the environment, for the CLI.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or a group is already initialized (the
    user's own engine set it up). Otherwise joins with ``nccl`` on cuda and ``gloo``
    elsewhere (on cuda each rank's current device becomes ``LOCAL_RANK``, so a plain
    ``cuda`` means that rank's GPU), and leaves the group on exit. Yields ``(rank, world_size)``.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield (_rank(), dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        return
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def command_batches(spec: str, what: str, student: nn.Module, teacher: nn.Module, *, epochs: int = 1,
                    rank: int = 0, world: int = 1, labels: bool = False) -> Iterable:
    """The batches a ``file.py:NAME`` / ``module:NAME`` spec names, checked on both models (for the CLI).

    Raises :class:`~dsrewrite.errors.UsageError` for data that is not batches, a one-shot
    iterator asked for several epochs, or missing labels where ``labels`` is required, and
    :class:`~dsrewrite.errors.InputError` when the first batch does not run through both
    models or their outputs differ in shape. A list of batches is split across ranks.
    """
    import itertools

    from .errors import InputError, UsageError
    from .load import load_object
    from .trace import eval_mode

    data = load_object(spec, what)
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise UsageError(f"{what} {spec}: expected an iterable of batches (a list or a DataLoader), "
                         f"got a {type(data).__name__}")
    one_shot = iter(data) is data
    if one_shot and epochs > 1:
        raise UsageError(f"{what} {spec}: a one-shot iterator cannot be read for {epochs} epochs; "
                         "give a list or a DataLoader, or a function returning one")
    if world > 1 and isinstance(data, (list, tuple)):
        data = list(data)[rank::world]
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise UsageError(f"{what} {spec}: no batches")
    if one_shot:
        data = itertools.chain([first], iterator)
    if not isinstance(first, torch.Tensor) and not (
            isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first[:2])):
        raise UsageError(f"{what} {spec}: a batch must be an input tensor or an (inputs, labels) pair, "
                         f"got a {type(first).__name__}")
    x, y = _split(first, "cpu")
    if labels and y is None:
        raise UsageError(f"{what} {spec}: accuracy needs (inputs, labels) batches")
    outputs = []
    for who, model in (("teacher", teacher), ("student", student)):
        try:
            with eval_mode(model), torch.no_grad():
                outputs.append(model(x.to(next(model.parameters()).device)))
        except Exception as e:
            raise InputError(f"{what} {spec}: the first batch (inputs {tuple(x.shape)}) fails in the {who}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not all(isinstance(o, torch.Tensor) for o in outputs) or outputs[0].shape != outputs[1].shape:
        shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in outputs]
        raise InputError(f"the teacher and the student give different outputs ({shapes[0]} vs {shapes[1]}); "
                         "distillation needs the same logits from both")
    if y is not None and (y.dtype.is_floating_point or y.ndim != 1 or y.shape[0] != x.shape[0]):
        raise UsageError(f"{what} {spec}: labels must be one class index per input, got {y.dtype} "
                         f"{tuple(y.shape)} for inputs {tuple(x.shape)}")
    return data
