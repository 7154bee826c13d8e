"""The Ray job on one GPU, with the host's CPUs as decode workers, against the two ceilings it can reach.

    python benchmarks/ray_job_gpu.py [--cases 24] [--output benchmarks/RESULTS-ray-gpu.md]   # on the GPU machine
    bash benchmarks/ray_job_gpu.sh                  # the same on a machine without a package index (see there)
    PYTHONPATH=. python benchmarks/ray_job_gpu.py --model fetalclip-micro --cases 6 --frames-per-sweep 4 \\
        --height 140 --width 186                    # a CPU trial in a minute

From the repository root, with fetaliqa importable; the device is the first GPU if there is one, else the CPU
(then the actor and the training worker get no GPU). In order:
  1. `--cases` ACOUSLIC-size cases (6 x 140 frames of 562 x 744): `--distinct-cases` synthesised
     (`write_synthetic_archive`, ~9.5 s a case on one core), the rest hard links to them under new uuids, masks and
     csv rows too, so the page cache holds only the distinct files;
  2. random-init weights: a CLS and a SEG checkpoint (`save_checkpoint`) to score with, and the FetalCLIP tower
     as safetensors, which LoRA training needs as `--weights` (speed does not depend on the weights);
  3. the decode rate of one core: `read_case_row` (read + resize into a reused `DecodeBuffer`, as a read task
     does) of one case in a child process pinned to one CPU;
  4. the predictor alone: `ScoreFrames` on one case's resized frames at the device's default batch
     (`gpu_throughput.predictor_rates`, the figures of benchmarks/RESULTS-gpu.md);
  5. the job: `python -m jobs.score ... --num-gpus-per-actor 1` for CLS, then SEG, each a process with its own
     local Ray over all host CPUs. Its steady state is read off the committed parts: the frames of the parts
     after the first over the time from the first commit to the last (commit records' mtimes);
  6. `python -m jobs.train --task cls --epochs 1 --workers 1 --use-gpu` (LoRA), timed.
The target: steady state >= 0.9 x min(predictor alone, decode cores x per-core rate), decode cores being the
CPUs Ray leaves the read tasks (host CPUs less the actor's one). Markdown goes to `--output`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import save_file

import fetaliqa
from fetaliqa.inputs import layout
from fetaliqa.inputs.metaimage import DecodeBuffer
from fetaliqa.models import DEFAULT_THRESHOLD, build_model, save_checkpoint
from fetaliqa.models.encoders import create_image_tower
from fetaliqa.models.frame_model import default_batch_size
from fetaliqa.score.ledger import PARTS_DIR
from fetaliqa.score.predict import ScoreFrames
from fetaliqa.score.read import read_case_row
from fetaliqa.score.schema import FRAMES, RUN_RECORD, part_name
from fetaliqa.synthetic.archive import write_synthetic_archive
from fetaliqa.training.protocol import load_split

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path (tests)
from gpu_throughput import device_name, predictor_rates  # noqa: E402
from score_throughput import single_thread  # noqa: E402

TASKS = ("cls", "seg")
ACTOR_CPUS = 1  # `jobs.score --cpus-per-actor`'s default: the CPU the predictor actor holds
TARGET = 0.9
# Parts that all commit within this share of the run's time came in a burst (the writers starved until the end),
# not at the pipeline's pace: their steady state is flagged in the results.
BUNCHED = 0.25


# 1. Data -------------------------------------------------------------------------------------------------

def write_cases(root: Path, cases: int, distinct: int, frames_per_sweep: int, height: int, width: int) -> list[str]:
    """Synthesise `distinct` cases under `root` (ACOUSLIC layout) and hard-link them up to `cases`; their ids."""
    ids = write_synthetic_archive(str(root), distinct, frames_per_sweep, height, width, seed=0)
    return ids + replicate_cases(root, ids, cases - len(ids))


def replicate_cases(root: Path, sources: list[str], copies: int) -> list[str]:
    """Add `copies` cases to the archive at `root`, each a hard link of the image and mask of one of `sources`
    (in turn) under a new uuid, with its csv row; the new ids. Deterministic: a copy's id is a uuid5 of its
    source's id and its number."""
    csv_path = root / layout.CIRCUMFERENCES_CSV
    with csv_path.open(newline="") as f:
        rows = {row["uuid"]: row for row in csv.DictReader(f)}
    new_ids = []
    for k in range(copies):
        source = sources[k % len(sources)]
        case_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{source}/{k}"))
        for folder in (layout.IMAGES_DIR, layout.MASKS_DIR):
            os.link(root / folder / f"{source}.mha", root / folder / f"{case_id}.mha")
        rows[case_id] = rows[source] | {"uuid": case_id}
        new_ids.append(case_id)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=layout.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows.values())
    return new_ids


# 2. Weights ----------------------------------------------------------------------------------------------

def write_weights(model: str, tasks: list[str], work: Path) -> tuple[dict[str, str], str, int]:
    """Random-init checkpoints {task: folder} for scoring, the tower's weights (safetensors) for LoRA, and the
    model's input size."""
    checkpoints = {}
    for task in tasks:
        net, preprocess = build_model(model, task, seed=0)
        checkpoints[task] = str(work / f"checkpoint-{task}")
        save_checkpoint(net, checkpoints[task], threshold=DEFAULT_THRESHOLD[task], preprocess=preprocess)
    torch.manual_seed(0)
    tower = create_image_tower(model)
    weights = str(work / f"{model}-tower.safetensors")
    save_file({name: value.contiguous() for name, value in tower.state_dict().items()}, weights)
    return checkpoints, weights, preprocess.image_size


# 3. Decode rate of one core ------------------------------------------------------------------------------

def core_decode_rate(case_id: str, source: str, image_size: int, repeats: int) -> tuple[float, int]:
    """Frames/s of `read_case_row` on one case in a child process pinned to one CPU, every library one thread
    (after one untimed read, which warms the page cache and the imports), and that CPU."""
    cpu = max(os.sched_getaffinity(0))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_decode_on_one_core, cpu, case_id, source, image_size, repeats).result(), cpu


def _decode_on_one_core(cpu: int, case_id: str, source: str, image_size: int, repeats: int) -> float:
    os.sched_setaffinity(0, {cpu})
    single_thread()  # torch, BLAS, SimpleITK and OpenCV: threads beyond one would only share the core
    buffer = DecodeBuffer()  # as a read task decodes its cases
    read_case_row(case_id, source, image_size=image_size, buffer=buffer)
    started = time.perf_counter()
    frames = sum(len(read_case_row(case_id, source, image_size=image_size, buffer=buffer)["images"])
                 for _ in range(repeats))
    return frames / (time.perf_counter() - started)


# 4. The predictor alone ----------------------------------------------------------------------------------

def predictor_alone(checkpoint: str, case_id: str, source: str, device: torch.device, repeats: int) -> dict:
    """`ScoreFrames` on one case's resized frames at the device's default batch: frames/s of one call at a
    time ("predictor") and of two at once ("concurrent", as a GPU actor runs them)."""
    predictor = ScoreFrames(checkpoint, device=str(device))
    frames = read_case_row(case_id, source, image_size=predictor.model.meta["preprocess"]["image_size"])["images"]
    batch = default_batch_size(device)
    rates = predictor_rates(predictor, frames, [batch], repeats, device)
    del predictor
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the jobs' actors need the GPU next
    return {"predictor": rates["predictor"][batch], "concurrent": rates["concurrent"][batch], "batch": batch,
            "frames": len(frames)}


# 5. The job, and its steady state ------------------------------------------------------------------------

def run_module(argv: list[str], timeout: float) -> float:
    """Run `python -m <argv>` from the repository root, its output passed through; its wall seconds."""
    print(f"\n$ python -m {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", *argv], check=True, timeout=timeout)
    return time.perf_counter() - started


def score_job(task: str, root: Path, checkpoint: str, out: Path, gpus: int, timeout: float) -> dict:
    """`jobs.score` over the archive: wall seconds, run.json's frames and frames/s, and the parts' steady state."""
    wall = run_module(["jobs.score", "--input", str(root), "--checkpoint", checkpoint, "--output", str(out),
                       "--num-gpus-per-actor", str(gpus), "--progress-seconds", "5"], timeout)
    run = json.loads((out / RUN_RECORD).read_text())
    commits = part_commits(out)
    return {"task": task, "wall": wall, "frames": run["frames"], "run_frames_per_s": run["frames_per_s"],
            "run_seconds": run["seconds"], "parts": len(commits), "steady": steady_rate(commits),
            "window": commits[-1][0] - commits[0][0] if commits else 0.0}


def part_commits(out: Path) -> list[tuple[float, int]]:
    """(commit time, frames) of each committed part of a scoring output: its record's mtime, its frames
    file's rows (0 where the part scored no frame)."""
    commits = []
    for record in (out / PARTS_DIR).glob("*.json"):
        frames = out / FRAMES / part_name(record.stem)
        commits.append((record.stat().st_mtime, pq.read_metadata(frames).num_rows if frames.exists() else 0))
    return sorted(commits)


def steady_rate(commits: list[tuple[float, int]]) -> float | None:
    """Frames/s between the first commit and the last: the frames of every part after the first over that
    time (the first part's frames were scored before the window opened). None with fewer than two commits
    or none apart in time."""
    commits = sorted(commits)
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return None
    return sum(frames for _, frames in commits[1:]) / (commits[-1][0] - commits[0][0])


# 6. Training ---------------------------------------------------------------------------------------------

def train_job(root: Path, model: str, weights: str, out: Path, use_gpu: bool, frames_per_sweep: int,
              timeout: float) -> dict:
    """One epoch of `jobs.train` (CLS, LoRA, one worker): wall seconds and the epoch's training frames."""
    wall = run_module(["jobs.train", "--data", str(root), "--task", "cls", "--model", model, "--weights", weights,
                       "--epochs", "1", "--workers", "1", *(["--use-gpu"] if use_gpu else []), "--output", str(out)],
                      timeout)
    split = load_split(str(out))
    train_frames = sum(len(split.sweeps[case]) for case in split.train) * frames_per_sweep
    return {"wall": wall, "train_frames": train_frames, "train_cases": len(split.train)}


# Report --------------------------------------------------------------------------------------------------

def ceiling(predictor: float, decode_cores: int, per_core: float) -> float:
    return min(predictor, decode_cores * per_core)


def markdown(args: argparse.Namespace, device: torch.device, figures: dict) -> str:
    """The figures as a Markdown section; its first line says when it is a CPU trial."""
    cores, per_core, cpu = figures["decode_cores"], figures["per_core"], figures["decode_cpu"]
    frames_per_case = 6 * args.frames_per_sweep
    lines = ["# Ray job on one GPU: `jobs.score` (CLS, SEG) and one epoch of `jobs.train`", ""]
    if device.type != "cuda":
        lines = ["CPU trial (no GPU was lent): not the GPU figures.", "", *lines]
    lines += [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`.", "",
        f"Device: {device_name(device)}; host CPUs {figures['host_cpus']}; Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, ray {ray.__version__}, fetaliqa {fetaliqa.__version__}; model `{args.model}` "
        f"(random init).", "",
        f"Data: {args.cases} cases of {frames_per_case} frames of {args.height} x {args.width} "
        f"({figures['frames_total']:,} frames), {args.distinct_cases} synthesised and the rest hard links to them "
        f"under new uuids: the page cache holds only the distinct files, so reads come from memory.", "",
        f"Jobs: `python -m jobs.score --input ARCHIVE --checkpoint CHECKPOINT --output OUT --num-gpus-per-actor "
        f"{figures['gpus']}` per task, then `python -m jobs.train --data ARCHIVE --task cls --model {args.model} "
        f"--weights TOWER.safetensors --epochs 1 --workers 1{' --use-gpu' if figures['gpus'] else ''} --output OUT2`, "
        "each a process with its own local Ray.", "",
        f"| figure | {' | '.join(t.upper() for t in args.tasks)} |", f"|---|{'---|' * len(args.tasks)}"]

    def row(label: str, key, fmt: str = "{:,.0f}") -> str:
        cells = [fmt.format(v) if (v := key(task)) is not None else "-" for task in args.tasks]
        return f"| {label} | {' | '.join(cells)} |"

    alone, jobs = figures["alone"], figures["jobs"]
    batch = alone[args.tasks[0]]["batch"]
    lines += [
        row(f"predictor alone (`ScoreFrames`, one {frames_per_case}-frame case a call, batch {batch}), frames/s",
            lambda t: alone[t]["predictor"]),
        row("predictor alone, two concurrent calls (as the GPU actor runs), frames/s", lambda t: alone[t]["concurrent"]),
        row(f"decode ceiling: {cores} decode cores x {per_core:,.0f} frames/s a core (`read_case_row`, CPU {cpu})",
            lambda t: cores * per_core),
        row("job: steady state, frames of the parts after the first / first to last commit, frames/s",
            lambda t: jobs[t]["steady"]),
        row("job: committed parts", lambda t: jobs[t]["parts"], "{}"),
        row("job: first to last commit, s (of the run's own seconds)",
            lambda t: f"{jobs[t]['window']:.1f} (of {jobs[t]['run_seconds']:.1f})", "{}"),
        row("job: frames / wall of the whole command (Ray start, model load, drain), frames/s",
            lambda t: jobs[t]["frames"] / jobs[t]["wall"]),
        row("job: wall seconds", lambda t: jobs[t]["wall"], "{:.1f}"),
        row("job: run.json frames_per_s (the run's own clock, after Ray starts)", lambda t: jobs[t]["run_frames_per_s"]),
        row(f"steady state / min(predictor alone, decode ceiling) (target >= {TARGET})",
            lambda t: ratio(jobs[t]["steady"], ceiling(alone[t]["predictor"], cores, per_core)), "{:.2f}"),
        ""]
    bunched = [t.upper() for t in args.tasks if jobs[t]["window"] < BUNCHED * jobs[t]["run_seconds"]]
    if bunched:
        lines += [f"- {', '.join(bunched)}: the parts committed within {BUNCHED:.0%} of the run's time, in a burst "
                  "rather than as the frames streamed through, so the steady state above is the burst's rate, "
                  "not the pipeline's; read the whole-run rates instead.", ""]
    train = figures["train"]
    lines += ["Training (LoRA on the random-init tower): "
              f"{train['wall']:.1f} s wall for {train['train_frames']:,} training "
              f"frames ({train['train_cases']} cases' AC sweeps), {train['train_frames'] / train['wall']:,.0f} frames/s "
              "over the wall: a lower bound on the epoch's rate, since the wall also holds Ray's start, decoding "
              "every case, validation, and scoring the validation and test frames.", ""]
    if device.type != "cuda":
        lines += ["On CPU the predictor runs on the cores that decode, so the ceiling above is not one here; the "
                  "trial shows the script runs end to end.", ""]
    return "\n".join(lines)


def ratio(value: float | None, bound: float) -> float | None:
    return None if value is None else value / bound


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fetalclip", help="model name (fetalclip-micro for a CPU trial)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                        help="scoring jobs to run (SEG's decoder is slow on CPU: cls alone for a CPU trial)")
    parser.add_argument("--cases", type=int, default=24, help="cases scored (and trained on)")
    parser.add_argument("--distinct-cases", type=int, default=2, help="cases synthesised; the rest are hard links")
    parser.add_argument("--frames-per-sweep", type=int, default=140)
    parser.add_argument("--height", type=int, default=562)
    parser.add_argument("--width", type=int, default=744)
    parser.add_argument("--repeats", type=int, default=3, help="timed predictor calls after one warm-up")
    parser.add_argument("--decode-repeats", type=int, default=2, help="timed reads of a case on one core")
    parser.add_argument("--job-timeout", type=float, default=300, help="seconds allowed each job command")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/RESULTS-ray-gpu.md"),
                        help="Markdown written here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 1 <= args.distinct_cases <= args.cases:
        raise SystemExit("--distinct-cases must be between 1 and --cases")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = 1 if device.type == "cuda" else 0
    work = args.work or Path(tempfile.mkdtemp(prefix="fetaliqa-ray-job-"))
    try:
        figures = measure(args, device, gpus, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(args, device, figures)
    args.output.write_text(text)
    print(text)


def measure(args: argparse.Namespace, device: torch.device, gpus: int, work: Path) -> dict:
    """Every figure, in the module docstring's order; each step's seconds printed as it ends."""
    started = time.perf_counter()

    def done(step: str) -> None:
        print(f"[ray_job_gpu] {step}: done at {time.perf_counter() - started:.1f} s", flush=True)

    root = work / "archive"
    ids = write_cases(root, args.cases, args.distinct_cases, args.frames_per_sweep, args.height, args.width)
    source = str(root / layout.IMAGES_DIR / f"{ids[0]}.mha")
    done(f"{len(ids)} cases")
    checkpoints, weights, image_size = write_weights(args.model, args.tasks, work)
    done("weights")
    host_cpus = len(os.sched_getaffinity(0))
    per_core, cpu = core_decode_rate(ids[0], source, image_size, args.decode_repeats)
    done(f"decode rate of one core: {per_core:,.0f} frames/s")
    alone = {task: predictor_alone(checkpoints[task], ids[0], source, device, args.repeats) for task in args.tasks}
    done("predictor alone")
    jobs = {task: score_job(task, root, checkpoints[task], work / f"scores-{task}", gpus, args.job_timeout)
            for task in args.tasks}
    done("scoring jobs")
    train = train_job(root, args.model, weights, work / "train", gpus > 0, args.frames_per_sweep, args.job_timeout)
    done("training job")
    return {"gpus": gpus, "host_cpus": host_cpus, "decode_cores": max(1, host_cpus - ACTOR_CPUS), "per_core": per_core,
            "decode_cpu": cpu, "alone": alone, "jobs": jobs, "train": train,
            "frames_total": args.cases * 6 * args.frames_per_sweep}


if __name__ == "__main__":
    main()
