"""The per-worker training loop run by Ray Train's `TorchTrainer`, and its checkpoints.

Each worker builds the model, wraps it in DDP (`prepare_model`: gloo on CPU, NCCL on GPU), trains on its
shard of "train" and measures the loss on its shard of "val"; losses are summed across workers so every
rank reports the same global means. After each epoch rank 0 writes a fetaliqa checkpoint (adapters and
head, `save_checkpoint`) plus `train_state.pt` (epoch and optimizer state) and reports it. A worker group
that starts with a checkpoint (after a failure, or a rerun of the same run) resumes after its epoch.

Batches: `image` (B, S, S) uint8, `label` (B,) uint8 and, for SEG, `mask` (B, S, S) uint8 {0, 1}.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConsistencyMode

from fetaliqa.models import DEFAULT_THRESHOLD, build_model, load_trained_tensors, save_checkpoint, torch_seed
from fetaliqa.training.step import LOSSES, run_epoch

TRAIN_STATE_FILE = "train_state.pt"
# Fault injection for tests: a marker path. When set and the file is absent, the last rank creates it and
# exits right after the first epoch's checkpoint is committed, once, so a test can watch Ray Train restart
# the worker group from that checkpoint. The recipe reads it in the driver and passes it in `LoopConfig`.
KILL_ONCE_ENV = "FETALIQA_FAULT_KILL_TRAIN_WORKER_ONCE"


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs. `model`: keyword arguments of `build_model` (name, task, weights, lora,
    seed, ...). `batch_size` is global: each of W workers takes batch_size // W frames per step."""

    model: dict[str, Any]
    loss: str | None = None  # a key of step.LOSSES; None: the model's task's
    # DDP must look for trainable parameters without a gradient when the model has some: the paper's
    # out_proj-only LoRA on FetalCLIP is never used in the forward pass.
    find_unused_parameters: bool = False
    resize: str = "bicubic"  # the frames' resize (`preprocess.RESIZES`), recorded in each checkpoint
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-4
    storage_options: dict | None = field(default=None, repr=False)
    fault_marker: str | None = None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config = {"loop": LoopConfig}`."""
    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # LoRA dropout: reproducible, distinct per rank (torch_seed: the paper's seed exceeds int64).
    torch.manual_seed(torch_seed(cfg.model.get("seed", 0) * 1000 + rank))
    model, preprocess = build_model(**cfg.model, storage_options=cfg.storage_options)
    preprocess = replace(preprocess, interpolation=cfg.resize)
    wrapped = ray.train.torch.prepare_model(  # DDP when world > 1; moved to the worker's device
        model, parallel_strategy_kwargs={"find_unused_parameters": cfg.find_unused_parameters})
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)
    start = restore(ray.train.get_checkpoint(), model, optimizer, device)
    per_worker = max(1, cfg.batch_size // world)
    loss_fn = LOSSES[cfg.loss or model.task]
    trainable = sum(p.numel() for p in model.trainable_parameters())

    def batches(name: str):
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=per_worker, device=device)

    for epoch in range(start, cfg.epochs):
        wrapped.train()
        train_loss = run_epoch(wrapped, loss_fn, batches("train"), preprocess, device, optimizer)
        model.eval()  # validation on the bare module: no DDP collectives in its forward
        with torch.no_grad():
            val_loss = run_epoch(model, loss_fn, batches("val"), preprocess, device)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "resumed_from_epoch": start,
                   "trainable_parameters": trainable, "replica_checksums": replica_checksums(model)}
        report(metrics, model, preprocess, optimizer, rank)
        if epoch == start:
            _maybe_die_once(cfg.fault_marker, rank, world)


def replica_checksums(model: torch.nn.Module) -> list[float]:
    """Sum of every trainable parameter (float64) on each rank, gathered: equal entries mean the replicas
    are in step. One number per rank, in rank order."""
    local = torch.stack([p.detach().double().sum() for p in model.trainable_parameters()]).sum()
    if not (dist.is_available() and dist.is_initialized()):
        return [local.item()]
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.item() for g in gathered]


def report(metrics: dict, model, preprocess, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """`ray.train.report` the epoch's metrics on every rank, with a checkpoint written by rank 0 only."""
    with tempfile.TemporaryDirectory(prefix="fetaliqa-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(model, tmp, threshold=DEFAULT_THRESHOLD[model.task], preprocess=preprocess, metrics=metrics)
            torch.save({"epoch": metrics["epoch"], "optimizer": optimizer.state_dict()},
                       os.path.join(tmp, TRAIN_STATE_FILE))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{metrics['epoch']:03d}")


def restore(checkpoint: Checkpoint | None, model, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Load model tensors and optimizer state from a checkpoint of `report`; return its epoch (0: none).

    The model's tensors are read and checked by `models.load_trained_tensors` (the checkpoint format's one
    reader); the optimizer state with torch.load(weights_only=True). Nothing is unpickled.
    """
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        load_trained_tensors(model, folder)
        state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    print(f"fetaliqa train: restored epoch {state['epoch']} from {checkpoint.path}", flush=True)
    return int(state["epoch"])


def _maybe_die_once(marker: str | None, rank: int, world: int) -> None:
    if not marker or rank != world - 1 or os.path.exists(marker):
        return
    # Wait until Ray Train has committed the checkpoint just reported, else the kill could race the
    # controller's collection of the report and the restart would begin from scratch.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    open(marker, "w").close()
    os._exit(1)
