"""What a training run writes under `--output` (any fsspec URL), and where Ray Train keeps its checkpoints.

```
<output>/split.json                     the case-level split and the AC sweeps used (protocol.py)
<output>/results.md                     test metrics, mean ± std over trials, in the paper's table form,
                                        one row per model
<trial>/checkpoint/                     the exported model: fetaliqa.json (threshold = best validation F1)
                                        + weights.safetensors; what `fetaliqa score --checkpoint` takes
<trial>/metrics.json                    thresholds and test metrics (evaluate.py)
<trial>/ray/epoch-NNN/                  Ray Train's checkpoints (the best by val_loss and the latest)
```
`<trial>` is `<run>` itself for one trial, `<run>/trial-<k>` (k = 1..K) for `--trials K`; `<run>` is `<output>`
for one `--model`, `<output>/<model>` (`model_output`) for several.
"""

from __future__ import annotations

import json

import pyarrow.fs
from ray.train import Checkpoint

from fetaliqa.evaluation.metrics import format_paper_table, mean_std_table
from fetaliqa.inputs.storage import StorageOptions, filesystem, is_local, join
from fetaliqa.models import PreprocessSpec, load_checkpoint, save_checkpoint

RAY_RUN = "ray"  # Ray Train's run name: the folder of its checkpoints under <trial>
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
PAPER_KEYS = ("accuracy", "f1", "precision", "recall", "trainable_parameters")


def model_output(output: str, model: str, models: int) -> str:
    """Folder of one model's run: `output` itself for a single model, else `output/<model>` (":" -> "-")."""
    return output if models == 1 else join(output, model.replace(":", "-"))


def trial_output(output: str, k: int, trials: int) -> str:
    """Folder of trial k (0-based) of `trials`: `output` itself for one trial, else `output/trial-<k+1>`."""
    return output if trials == 1 else join(output, f"trial-{k + 1}")


def ray_storage(url: str, storage_options: StorageOptions = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local path as it is; any other URL
    through pyarrow's wrapper of the fsspec filesystem, so that s3:// with an endpoint, gs:// and the rest
    work with the same storage options as every other read and write."""
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def export_checkpoint(best: Checkpoint, url: str, threshold: float, metrics: dict,
                      storage_options: StorageOptions = None) -> None:
    """Write the model of Ray checkpoint `best` to the fetaliqa checkpoint folder `url` with `threshold` and
    `metrics` (`storage_options` serve `url` and the base weights the model may be built on)."""
    with best.as_directory() as folder:
        model, meta = load_checkpoint(folder, storage_options=storage_options)
    save_checkpoint(model, url, threshold=threshold, preprocess=PreprocessSpec.from_dict(meta["preprocess"]),
                    metrics=metrics, base_weights=meta.get("base_weights"), storage_options=storage_options)


def write_text(url: str, text: str, storage_options: StorageOptions = None) -> None:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "w") as f:
        f.write(text)


def write_json(url: str, value: dict, storage_options: StorageOptions = None) -> None:
    write_text(url, json.dumps(value, indent=2) + "\n", storage_options)


def results_markdown(runs: dict[str, list[dict]]) -> str:
    """results.md: the paper's table, one row per model, of the test metrics (accuracy, F1, precision,
    recall) and trainable parameters, mean ± std over trials; once at the default threshold (the paper's
    numbers) and once at the best-F1 validation threshold. runs: {row name: metrics.json dicts, one a trial}."""
    sections = []
    for key, title in (("default", "default threshold"), ("best_f1_val", "best-F1 validation threshold")):
        rows = {name: mean_std_table([t["test"][key] | {"trainable_parameters": t["trainable_parameters"]}
                                      for t in trials], keys=PAPER_KEYS) for name, trials in runs.items()}
        counts = sorted({len(trials) for trials in runs.values()})
        trials_text = " or ".join(map(str, counts)) + f" trial{'s' * (counts != [1])}"
        sections.append(f"## Test frames, {title} (mean ± std over {trials_text})\n\n{format_paper_table(rows)}")
    return "\n".join(sections)
