"""What every recipe shares: the `--storage-options` flag (which refuses credentials), starting or joining Ray,
the rule for local paths on a cluster of several nodes, and turning expected errors into one-line exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import ray

from fetaliqa.errors import FetaliqaError
from fetaliqa.inputs import storage
from fetaliqa.redact import redact_text

log = logging.getLogger("fetaliqa")


# Keys that hold a secret in fsspec's backends' options (s3fs and botocore, gcsfs, adlfs), at any depth
# (`client_kwargs`, `config_kwargs`, ...), compared in lower case. `anon` and `profile` (a name) are no secrets.
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "security_token",
    "account_key", "sas_token", "connection_string", "client_secret", "credential", "credentials",
})
CREDENTIALS_CHAIN = ("credentials come from the standard AWS/fsspec chain on every node: environment variables "
                     "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), shared credentials and config "
                     "files (~/.aws/credentials, AWS_PROFILE or {\"profile\": NAME}), instance or pod roles")


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, the one definition every job uses; it refuses credentials (see `_storage_options`)."""
    parser.add_argument("--storage-options", type=_storage_options, default=None,
                        help='JSON object of fsspec options, e.g. {"endpoint_url": "http://127.0.0.1:9000"}; '
                             "no credentials: " + CREDENTIALS_CHAIN)


def _storage_options(text: str) -> dict:
    """The JSON object `text`. A credential key at any depth raises `FetaliqaError` (which `run_recipe` reports
    as one line, exit code 2) naming the key, never its value: options travel in Ray task specs and a job's
    command line shows on the dashboard."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    found = _credential_keys(value, "")
    if found:
        raise FetaliqaError(f"--storage-options holds credentials ({', '.join(found)}); refused: they would travel "
                            f"in Ray task specs and show on the dashboard; {CREDENTIALS_CHAIN}")
    return value


def _credential_keys(options: dict, prefix: str) -> list[str]:
    """Dotted paths of the credential keys in `options` and the dicts nested in it."""
    found = []
    for key, value in options.items():
        path = f"{prefix}{key}"
        if str(key).lower() in CREDENTIAL_KEYS:
            found.append(path)
        elif isinstance(value, dict):
            found += _credential_keys(value, path + ".")
    return found


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a fresh local Ray.

    A local Ray gets at least 8 logical CPUs even on a 2-core machine. Ray Train workers and Ray Data's
    read and map tasks each hold a CPU, and with too few logical CPUs the data pipeline waits forever for a
    CPU a worker holds; and Ray Data reserves each operator a share of the logical CPUs (half of them,
    split over the operators): with 4, the scoring job's read operator got under one task's CPU and decoded
    one case at a time (24 ACOUSLIC-size cases on 2 cores: read concurrency 0.97, the reads spanning 80 s;
    with 8: 3.5 reads at a time, 64 s, the whole execution 88 -> 83 s). Logical CPUs are scheduling slots, not cores, so
    oversubscribing is safe; read tasks also declare their memory, which bounds how many run at once.
    `address="local"` never joins a stale cluster left behind by an earlier run.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=local_cpus or max(8, os.cpu_count() or 1), include_dashboard=False)


def add_shared_filesystem(parser: argparse.ArgumentParser) -> None:
    """`--shared-filesystem`, for jobs whose Ray tasks read or write the paths they are given."""
    parser.add_argument("--shared-filesystem", action="store_true",
                        help="local paths are on a filesystem that every node of the cluster mounts at the same path "
                             "(NFS, Lustre, ...); without it, a cluster of several nodes refuses local paths")


def absolute_local_paths(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Make the local paths among `args.<name>` absolute, in place: Ray's workers run in their own working
    directories, so a relative path would resolve differently on each. URLs (s3://, file://) are left as they are."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and value and "://" not in value:
            setattr(args, name, os.path.abspath(value))


def check_paths_reach_every_node(paths: dict[str, str | None], shared_filesystem: bool) -> None:
    """Refuse local paths when the job's Ray tasks may run on another node than the driver's; one line naming them.

    Read tasks, predictor actors and writers run anywhere on the cluster: a local path there is that node's own
    disk, so parts would land on each worker's disk and the driver's resume would see only its own. Tasks may run
    elsewhere when the cluster has more than one node, or when the driver's node offers no CPU (a head started
    with `--num-cpus 0`, whose work goes to nodes the autoscaler adds). `paths` maps a flag (without dashes) to
    its value; `shared_filesystem` (`--shared-filesystem`) says every node mounts those paths alike.
    """
    local = [f"--{flag} {path}" for flag, path in paths.items() if path and storage.is_local(path)]
    if shared_filesystem or not local:
        return
    alive = [node for node in ray.nodes() if node["Alive"]]
    own = ray.get_runtime_context().get_node_id()
    driver_cpus = next((node["Resources"].get("CPU", 0) for node in alive if node["NodeID"] == own), 0)
    if len(alive) > 1 or not driver_cpus:
        where = f"a cluster of {len(alive)} nodes" if len(alive) > 1 else "a cluster whose driver node has no CPU"
        raise FetaliqaError(f"{', '.join(local)}: local path(s) on {where}, where each node would read and write "
                            "its own disk; use object storage (s3://..., gs://...), or --shared-filesystem when every "
                            "node mounts these paths")


def run_recipe(recipe: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
               argv: list[str] | None) -> int:
    """Parse `argv`, run `recipe`, and report a FetaliqaError as one line on stderr (redacted:
    `fetaliqa.redact.redact_text`) with exit code 2."""
    # Libraries (open_clip, Ray) log their own INFO chatter to the root logger; show only their warnings.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        return recipe(parser.parse_args(argv))  # parsing too: `--storage-options` refuses credentials this way
    except FetaliqaError as err:
        print(f"{parser.prog}: error: {redact_text(str(err))}", file=sys.stderr)
        return 2
