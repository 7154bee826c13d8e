"""Fine-tune frame-quality models with Ray Train: `python -m jobs.train --data ... --task cls --model ... --output ...`.

The protocol of --recipe (fetaliqa: fetaliqa's own, the default; paper: the paper's code, see
fetaliqa/training/recipes.py): case-level split 70/10/20 (seed fixed, <output>/split.json) over the sweeps
with an AC value -> frame datasets (Ray Data: decode, resize; fetaliqa: the train set reshuffled and
augmented every epoch; paper: a plain and an augmented copy of each train frame made once, reshuffled)
-> per --model: TorchTrainer.fit (DDP workers, a checkpoint per epoch) -> the best epoch by validation
loss -> the threshold of best validation F1 -> <trial>/checkpoint/ and <trial>/metrics.json ->
<output>/results.md (one row per model: the baseline sweep is several --model values, with --weights in
the same order). --trials K repeats training with seeds S..S+K-1 on the same split. Rerunning the same command with the
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

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs.listing import archive_root, list_cases
from fetaliqa.inputs.stacks import read_circumferences
from fetaliqa.inputs.storage import join
from fetaliqa.models import default_trainable
from fetaliqa.training import data, holdout, outputs
from fetaliqa.training.loop import KILL_ONCE_ENV, LoopConfig, train_loop_per_worker
from fetaliqa.training.protocol import make_split, save_split
from fetaliqa.training.recipes import RECIPES, Recipe
from jobs.common import add_storage_options, init_ray, run_recipe
from jobs.info import model_name


def build_parser(prog: str = "python -m jobs.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="annotated cases, any input `score` reads (an ACOUSLIC root, a folder or "
                        "prefix of stacks or DICOM studies, a manifest), with masks and csv in the ACOUSLIC layout "
                        "under its root")
    parser.add_argument("--task", required=True, choices=("cls", "seg"))
    parser.add_argument("--model", required=True, nargs="+", type=model_name, metavar="NAME",
                        help="model name(s), e.g. fetalclip, fetalclip-tiny, timm:densenet121; several: one row each")
    parser.add_argument("--weights", default=None, nargs="+", metavar="URL",
                        help="pretrained encoder weights (path or URL), one per --model in its order; none: random "
                             "init, which only --full-finetune can train")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="fetaliqa",
                        help="fetaliqa: fetaliqa's own protocol (default); paper: the paper's code's split, offline "
                             "augmentation, LoRA targets, SEG loss and p > 0.5 (see README, Reproducing the paper)")
    parser.add_argument("--output", required=True, help="output folder (local path or fsspec URL)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP replicas)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="CPUs reserved per worker; fractional so Ray Data's tasks keep CPUs (default 0.5)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split across the workers")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--trials", type=int, default=1, help="training runs with seeds S..S+K-1 on one split")
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed S, and the first trial's seed (default: the recipe's: 0, or the paper's "
                             "9872398152123123767126; torch takes trial seeds modulo 2**63)")
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
    so, recipe = args.storage_options, RECIPES[args.recipe]
    weights = check_models(args)  # before any work: no listing, no split, no Ray
    seed = recipe.seed if args.seed is None else args.seed
    cases = list_cases(args.data, so)
    split = make_split([c.case_id for c in cases], read_circumferences(archive_root(args.data), so), seed, recipe.name)
    save_split(split, args.output, so)
    init_ray()
    # Decoded once, shared by every model and trial; the paper's train copies are drawn from the split seed.
    frames = data.frame_datasets(cases, split, args.task, so, paper_copies_seed=seed if recipe.paper_copies else None)
    runs = {}
    for model, model_weights in zip(args.model, weights):
        out = outputs.model_output(args.output, model, len(args.model))
        trials = [run_trial(args, recipe, model, model_weights, split, frames, seed + k,
                            outputs.trial_output(out, k, args.trials)) for k in range(args.trials)]
        runs[f"{model} {args.task.upper()} ({_mode(args, model)}, {recipe.name} recipe)"] = trials
    table = outputs.results_markdown(runs)
    outputs.write_text(join(args.output, outputs.RESULTS_FILE), table, so)
    print(table, end="", flush=True)
    return 0


def check_models(args: argparse.Namespace) -> list[str | None]:
    """Each --model's weights (None where there are none); FetaliqaError, one line, where --weights does not
    pair with --model or where LoRA or a linear probe would train on a randomly initialised encoder: it
    learns nothing (a frozen random encoder) while looking like a run."""
    weights = args.weights or [None] * len(args.model)
    if len(weights) != len(args.model):
        raise FetaliqaError(f"--weights gives {len(weights)} files for {len(args.model)} --model values; give one per "
                            "model, in the same order")
    for model, url in zip(args.model, weights):
        if url is None and _mode(args, model) in ("lora", "linear"):
            what = "LoRA" if _mode(args, model) == "lora" else "a linear probe"
            raise FetaliqaError(f"no --weights for {model}: {what} on a randomly initialised encoder learns nothing; "
                                "pass --weights URL (its pretrained weights), or --full-finetune to train every "
                                "parameter from scratch")
    return weights


def _mode(args: argparse.Namespace, model: str) -> str:
    """What trains: the chosen mode, or the paper's for this model (LoRA for transformers, full for CNNs)."""
    return args.finetune or default_trainable(model)


def run_trial(args: argparse.Namespace, recipe: Recipe, model: str, weights: str | None, split, frames: dict,
              seed: int, out: str) -> dict:
    """Train one trial of `model` into `out`, export its best epoch with the best validation-F1 threshold;
    return its metrics."""
    so = args.storage_options
    result = fit(args, recipe, frames, model_kwargs(args, recipe, model, weights, seed), out)
    best = result.get_best_checkpoint(metric="val_loss", mode="min")
    # Validation and test frames in one pass: one set of scoring actors, one model load.
    scores = holdout.score_frames(frames["val"].union(frames["test"]), best, args.workers, args.use_gpu, so)
    val, test = (holdout.select_cases(scores, split.part(part)) for part in ("val", "test"))
    metrics = holdout.evaluate(args.task, val, test, strict=recipe.strict) | {
        "seed": seed, "recipe": recipe.name, "best_epoch": _epoch_of(result, best),
        "trainable_parameters": result.metrics["trainable_parameters"]}
    outputs.export_checkpoint(best, join(out, outputs.CHECKPOINT_DIR), metrics["threshold"], metrics, so)
    outputs.write_json(join(out, outputs.METRICS_FILE), metrics, so)
    at = metrics["test"]["best_f1_val"]
    print(f"fetaliqa train: {model} seed {seed}: best epoch {metrics['best_epoch']}, "
          f"threshold {metrics['threshold']:.4f}, test F1 {at['f1']:.4f} (precision {at['precision']:.4f}, "
          f"recall {at['recall']:.4f}) -> {join(out, outputs.CHECKPOINT_DIR)}", flush=True)
    return metrics


def fit(args: argparse.Namespace, recipe: Recipe, frames: dict, model: dict, output: str):
    """One trial: Ray Train's TorchTrainer over the frame datasets, checkpoints under `output`."""
    loop = LoopConfig(model=model, loss=recipe.seg_loss if args.task == "seg" else None,
                      # the paper's FetalCLIP LoRA has adapters the CLS forward pass never uses (out_proj); its
                      # SEG model freezes the whole encoder, and every decoder parameter gets a gradient
                      find_unused_parameters=recipe.name == "paper" and args.task == "cls", resize=recipe.resize,
                      epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, storage_options=args.storage_options,
                      fault_marker=os.environ.get(KILL_ONCE_ENV))
    storage_path, storage_filesystem = outputs.ray_storage(output, args.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        # Fractional CPUs per worker: Ray Data's read, shuffle and augmentation tasks need CPUs of their own,
        # and workers holding whole CPUs on a small machine leave them none (ARCHITECTURE.md section 7).
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        datasets={"train": data.train_dataset(frames["train"], model["seed"], augment=not recipe.paper_copies),
                  "val": frames["val"].select_columns(data.tensor_columns(frames["val"]))},
        run_config=RunConfig(
            name=outputs.RAY_RUN, storage_path=storage_path, storage_filesystem=storage_filesystem,
            # Keep the best epoch by validation loss; Ray Train also keeps the latest, to resume from.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    return trainer.fit()


def model_kwargs(args: argparse.Namespace, recipe: Recipe, model: str, weights: str | None, seed: int) -> dict:
    """`build_model` keyword arguments for the chosen fine-tuning mode (None: the paper's choice per model,
    LoRA for transformers and full fine-tuning for CNNs), with the recipe's LoRA placement and SEG decoder."""
    lora = None if args.finetune in ("linear", "full") else recipe.lora(model)
    return {"name": model, "task": args.task, "weights": weights, "seed": seed, "lora": lora, "trainable": args.finetune,
            "decoder": recipe.decoder if args.task == "seg" else None}


def _epoch_of(result, checkpoint) -> int:
    """The epoch a checkpoint of `result` was reported at."""
    return next(m["epoch"] for c, m in result.best_checkpoints if c.path == checkpoint.path)


def main(argv: list[str] | None = None, prog: str = "python -m jobs.train") -> int:
    return run_recipe(train, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
