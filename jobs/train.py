"""Fine-tune a frame-quality model with Ray Train: `python -m jobs.train --data ... --task cls --model ... --output ...`.

The paper's protocol: case-level split 70/10/20 (seed fixed, <output>/split.json) over the sweeps with an
AC value -> frame datasets (Ray Data: decode, resize; the train set reshuffled and augmented every epoch)
-> TorchTrainer.fit (DDP workers, a checkpoint per epoch) -> the best epoch by validation loss -> the
threshold of best validation F1 -> <trial>/checkpoint/ and <trial>/metrics.json -> <output>/results.md.
--trials K repeats training with seeds S..S+K-1 on the same split. Rerunning the same command with the
same --output resumes each trial from its last checkpoint (Ray Train restores a run by storage path and
name); a finished trial is only exported and evaluated again. On a multi-node cluster --output must be
storage every node reaches (s3://, gs://, NFS): workers write their checkpoints there.
"""

from __future__ import annotations

import argparse
import os
import sys

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from fetaliqa.archive import list_cases, read_circumferences
from fetaliqa.models import LoraSpec, build_model
from fetaliqa.storage import join
from fetaliqa.training import data, evaluate, outputs
from fetaliqa.training.loop import KILL_ONCE_ENV, LoopConfig, train_loop_per_worker
from fetaliqa.training.protocol import make_split, save_split
from jobs.common import add_storage_options, init_ray, run_recipe


def build_parser(prog: str = "python -m jobs.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="annotated archive root (ACOUSLIC layout, with masks and csv)")
    parser.add_argument("--task", required=True, choices=("cls", "seg"))
    parser.add_argument("--model", required=True, help="model name, e.g. fetalclip, fetalclip-tiny")
    parser.add_argument("--weights", default=None, help="pretrained image-tower weights (path or URL); none: random init")
    parser.add_argument("--output", required=True, help="output folder (local path or fsspec URL)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP replicas)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="CPUs reserved per worker; fractional so Ray Data's tasks keep CPUs (default 0.5)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--trials", type=int, default=1, help="training runs with seeds S..S+K-1 on one split")
    parser.add_argument("--seed", type=int, default=0, help="split seed S, and the first trial's seed")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="finetune", action="store_const", const="lora",
                      help="LoRA adapters + head (the default for transformers)")
    mode.add_argument("--linear-probe", dest="finetune", action="store_const", const="linear", help="frozen encoder, head only")
    mode.add_argument("--full-finetune", dest="finetune", action="store_const", const="full",
                      help="every parameter (the default for CNN baselines)")
    parser.set_defaults(finetune=None)
    add_storage_options(parser)
    return parser


def train(args: argparse.Namespace) -> int:
    so = args.storage_options
    cases = list_cases(args.data, so)
    split = make_split([c.case_id for c in cases], read_circumferences(args.data, so), args.seed)
    save_split(split, args.output, so)
    init_ray()
    frames = data.frame_datasets(cases, split, args.task, so)  # decoded once, shared by every trial
    trials = [run_trial(args, split, frames, k) for k in range(args.trials)]
    table = outputs.results_markdown(f"{args.model} {args.task.upper()} ({args.finetune or 'paper recipe'})", trials)
    outputs.write_text(join(args.output, outputs.RESULTS_FILE), table, so)
    print(table, end="", flush=True)
    return 0


def run_trial(args: argparse.Namespace, split, frames: dict, k: int) -> dict:
    """Train trial k, export its best epoch with the best validation-F1 threshold; return its metrics."""
    so = args.storage_options
    seed, out = args.seed + k, outputs.trial_output(args.output, k, args.trials)
    result = fit(args, frames, seed, out)
    best = result.get_best_checkpoint(metric="val_loss", mode="min")
    # Validation and test frames in one pass: one set of scoring actors, one model load.
    scores = evaluate.score_frames(frames["val"].union(frames["test"]), best, args.workers, args.use_gpu, so)
    val, test = (evaluate.select_cases(scores, split.part(part)) for part in ("val", "test"))
    metrics = evaluate.evaluate(args.task, val, test) | {"seed": seed, "best_epoch": _epoch_of(result, best)}
    outputs.export_checkpoint(best, join(out, outputs.CHECKPOINT_DIR), metrics["threshold"], metrics, so)
    outputs.write_json(join(out, outputs.METRICS_FILE), metrics, so)
    at = metrics["test"]["best_f1_val"]
    print(f"fetaliqa train: trial {k + 1}/{args.trials} seed {seed}: best epoch {metrics['best_epoch']}, "
          f"threshold {metrics['threshold']:.4f}, test F1 {at['f1']:.4f} (precision {at['precision']:.4f}, "
          f"recall {at['recall']:.4f}) -> {join(out, outputs.CHECKPOINT_DIR)}", flush=True)
    return metrics


def fit(args: argparse.Namespace, frames: dict, seed: int, output: str):
    """One trial: Ray Train's TorchTrainer over the frame datasets, checkpoints under `output`."""
    loop = LoopConfig(model=model_kwargs(args, seed), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      storage_options=args.storage_options, fault_marker=os.environ.get(KILL_ONCE_ENV))
    storage_path, storage_filesystem = outputs.ray_storage(output, args.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        # Fractional CPUs per worker: Ray Data's read, shuffle and augmentation tasks need CPUs of their own,
        # and workers holding whole CPUs on a small machine leave them none (ARCHITECTURE.md section 7).
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        datasets={"train": data.train_dataset(frames["train"], seed),
                  "val": frames["val"].select_columns(data.tensor_columns(frames["val"]))},
        run_config=RunConfig(
            name=outputs.RAY_RUN, storage_path=storage_path, storage_filesystem=storage_filesystem,
            # Keep the best epoch by validation loss; Ray Train also keeps the latest, to resume from.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    return trainer.fit()


def model_kwargs(args: argparse.Namespace, seed: int) -> dict:
    """`build_model` keyword arguments for the chosen fine-tuning mode (None: the paper's recipe, i.e.
    LoRA for transformers and full fine-tuning for the CNN baselines)."""
    lora = None if args.finetune in ("linear", "full") else LoraSpec()
    return {"name": args.model, "task": args.task, "weights": args.weights, "seed": seed, "lora": lora,
            "trainable": args.finetune}


def _epoch_of(result, checkpoint) -> int:
    """The epoch a checkpoint of `result` was reported at."""
    return next(m["epoch"] for c, m in result.best_checkpoints if c.path == checkpoint.path)


def main(argv: list[str] | None = None, prog: str = "python -m jobs.train") -> int:
    return run_recipe(train, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
