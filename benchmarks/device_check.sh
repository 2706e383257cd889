#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (a lease is ~15 minutes of device time, start
# included): the kernel and op tests compiled for the GPU (no interpret mode), then the three
# benchmarks whose targets were only ever measured on a CPU (issues 3, 4 and 6). Each step has
# its own time limit and its output lands in $OUT, so a step that fails or hangs still leaves
# the others' results. Run from the repository root:
#
#   OUT=/tmp/gpu bash benchmarks/device_check.sh           # on the GPU machine (device tool)
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/device_check.sh   # smoke test of the script anywhere
#
# The device image has jax (CUDA), flax, orbax, safetensors, torch, transformers and peft, but
# not jlora: it runs from the checkout through PYTHONPATH. Its jax (0.11.2 when last seen) is
# newer than pyproject's pin (<0.11): a failure there may be the Pallas API moving, not a bug;
# env.txt records the versions. QUICK=1 runs the steps on tiny
# shapes with short limits (the benchmarks' own smoke modes), to check the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-check-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quick=${QUICK:-0}
status=0

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND, output to $OUT/NAME.txt, never aborts
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" >>"$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

: >"$OUT/summary.txt"
step env 60 $PY -c 'import jax, flax, sys; print(sys.version); print("jax", jax.__version__,
  "flax", flax.__version__); print(jax.devices()); print(jax.default_backend())'
[ -z "${NO_NVIDIA_SMI:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/env.txt" 2>&1

if [ "$quick" = 1 ]; then
  step tests 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_gathered.py -k rank1
  step ops 300 $PY -m benchmarks.ops --json --rounds 2
  step load 300 $PY -m benchmarks.load --json --repeats 1
  step bench 300 $PY -m jlora.cli bench --json --no-skewed --quick
else
  # At most 8.5 minutes in all, so that one call (limit 10) holds every step. The Pallas
  # kernels compiled by Triton against the float32 reference first, then the open targets.
  step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gathered.py \
    tests/test_kernels_segmented.py
  step load 60 $PY -m benchmarks.load --json
  step bench 200 $PY -m jlora.cli bench --json --no-skewed
  step ops 60 $PY -m benchmarks.ops --json
fi
cat "$OUT/summary.txt"
exit $status
