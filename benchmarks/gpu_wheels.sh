#!/usr/bin/env bash
# Wheels for the Ray job on a GPU machine that cannot reach a package index (benchmarks/ray_job_gpu.sh).
#
#     bash benchmarks/gpu_wheels.sh          # here, on a machine that reaches the index; from the repository root
#
# Downloads, at requirements.lock's versions, the wheels for CPython 3.12 on x86-64 Linux of what that machine
# lacks (WHEELS below), and packs them into folders .whl/call1, .whl/call2, ... of at most CALL_MIB each: one a
# device call, since a call carries at most 64 MiB of working tree and names at most 8 carried paths. A wheel
# over CALL_MIB (ray, ~76 MiB) is split into NAME.part00, NAME.part01, ... (`split`), which may land in different
# folders; ray_job_gpu.sh joins them again in part order (`cat`) and checks every wheel against SHA256SUMS (in the
# last folder). It ends by printing the calls to make, in order;
# ignored files carried earlier stay on the machine only while it is warm (~30 s after a call), so make them one
# right after the other. .whl/ is git-ignored; a rerun starts it afresh.
set -euo pipefail

# The machine's image (its KINDS.md list) has torch, numpy, pyarrow, pandas, fsspec, peft, timm, safetensors,
# opencv, pillow, scikit-learn, aiohttp, grpcio, msgpack, protobuf, pyyaml, requests, click, attrs, ... but not:
WHEELS=(
    ray                          # Ray Data, Ray Train
    jsonschema jsonschema-specifications referencing rpds-py   # ray's own requirement (jsonschema) and its needs
    pydantic pydantic_core annotated-types typing-inspection   # ray.train refuses to import without pydantic
    typing_extensions            # pydantic 2.14 needs >= 4.16, newer than the image may hold (pure Python: harmless)
    open_clip_torch ftfy wcwidth # the FetalCLIP tower; ftfy (and its wcwidth) is open_clip's tokenizer's need
    simpleitk deflate            # the .mha reader: header and writer (SimpleITK), the fast inflate (libdeflate)
    pydicom                      # imported by the lister (DICOM studies); its pixel plugins are not needed for .mha
)
CALL_MIB=60   # wheels a call carries: 64 MiB less the working tree (~1.5 MiB) and a margin
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

locked_version() {  # NAME -> its version in requirements.lock (names compared as pip does: case, - _ .)
    local pattern
    pattern=$(printf '%s' "$1" | sed 's/[-_.]/[-_.]/g')
    grep -i -E "^${pattern}==" requirements.lock | head -1 | cut -d= -f3
}

download() {  # every WHEELS entry at its locked version into .whl/all
    local platform_args=() name version
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    for name in "${WHEELS[@]}"; do
        version=$(locked_version "$name")
        [[ -n "$version" ]] || { echo "gpu_wheels.sh: $name is not in requirements.lock" >&2; exit 1; }
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platform_args[@]}" -d .whl/all "$name==$version"
    done
}

split_large() {  # each wheel over CALL_MIB -> NAME.partNN pieces of CALL_MIB, the whole file removed
    local wheel
    for wheel in .whl/all/*.whl; do
        if (( $(stat -c %s "$wheel") > CALL_MIB * 1048576 )); then
            split -b "${CALL_MIB}M" -d -a 2 "$wheel" "$wheel.part"
            rm "$wheel"
        fi
    done
}

pack_calls() {  # first-fit decreasing of .whl/all's files into .whl/call1, call2, ... of <= CALL_MIB each
    local budget=$((CALL_MIB * 1048576)) size file i
    local -a room=()
    while read -r size file; do
        for ((i = 0; i < ${#room[@]}; i++)); do
            (( room[i] >= size )) && break
        done
        if (( i == ${#room[@]} )); then room+=("$budget"); mkdir -p ".whl/call$((i + 1))"; fi
        room[i]=$((room[i] - size))
        mv "$file" ".whl/call$((i + 1))/"
    done < <(find .whl/all -type f -printf '%s %p\n' | sort -rn)
    rmdir .whl/all
    mv .whl/SHA256SUMS "$(find .whl -maxdepth 1 -name 'call*' | sort -V | tail -1)/"
}

print_calls() {
    local calls n
    calls=$(find .whl -maxdepth 1 -name 'call*' | wc -l)
    echo "Device calls, one right after the other (the machine keeps carried files ~30 s after a call):"
    for ((n = 1; n <= calls; n++)); do
        printf '  call %d: carry [".whl/call%d"] (%s), command: ' "$n" "$n" "$(du -sh ".whl/call$n" | cut -f1)"
        if (( n < calls )); then echo "ls -l .whl/call$n"; else echo "bash benchmarks/ray_job_gpu.sh"; fi
    done
    echo "  (timeout_s of the last: 600; it writes RESULTS-ray-gpu.md and ray_job_gpu.log under \$OUT)"
}

cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
rm -rf .whl
mkdir -p .whl/all
download
(cd .whl/all && sha256sum -- *.whl > ../SHA256SUMS)  # of the whole wheels, before any is split
split_large
pack_calls
ls -lR .whl
print_calls
