#!/usr/bin/env bash
# benchmarks/ray_job_gpu.py on a GPU machine that reaches no package index: the last of the device calls that
# benchmarks/gpu_wheels.sh prints (the calls before it carried .whl/call1, .whl/call2, ...). From the repository root:
#
#     bash benchmarks/ray_job_gpu.sh [ray_job_gpu.py options]
#     bash benchmarks/ray_job_gpu.sh --install-only       # join and install the wheels, and stop
#
# Joins the wheels that travelled in parts (`cat`, in part order, whichever call carried each part), checks every
# wheel against gpu_wheels.sh's SHA256SUMS (a part left behind by a machine that went cold between calls fails
# here, by name), installs them into $SITE (default /tmp/site; no index, no dependencies: gpu_wheels.sh chose them)
# and runs ray_job_gpu.py with $SITE and the repository first on PYTHONPATH. RESULTS-ray-gpu.md and the whole
# log (ray_job_gpu.log) go to $OUT (default out/ray-job-gpu).
set -euo pipefail

out=${OUT:-out/ray-job-gpu}
site=${SITE:-/tmp/site}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

join_wheels() {  # .whl/call*/NAME.whl and NAME.whl.partNN -> $wheels/NAME.whl, checked against SHA256SUMS
    local first name
    cp .whl/call*/*.whl "$wheels/"
    for first in .whl/call*/*.part00; do
        [[ -e $first ]] || continue
        name=$(basename "${first%.part00}")
        # parts sorted by file name (partNN), not by the folder that carried them
        find .whl -name "$name.part*" -printf '%f %p\n' | sort | cut -d' ' -f2 | xargs cat > "$wheels/$name"
    done
    cat .whl/call*/SHA256SUMS > "$wheels/SHA256SUMS"
    (cd "$wheels" && sha256sum --quiet -c SHA256SUMS)
}

install_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl
}

main() {
    join_wheels
    install_wheels
    echo "ray_job_gpu.sh: installed $(ls "$wheels"/*.whl | wc -l) wheels into $site"
    [[ ${1:-} == --install-only ]] && return
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi -L || true
    python3 benchmarks/ray_job_gpu.py --output "$out/RESULTS-ray-gpu.md" "$@"
}

mkdir -p "$out"
main "$@" 2>&1 | tee "$out/ray_job_gpu.log"
