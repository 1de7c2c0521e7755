#!/usr/bin/env bash
# The GPU measurements that CPU-only sessions owe, in priority order, as one device call:
#
#   ../shared/tools/device-wheels.sh flatbuffers         # here, once: wheels the device lacks
#   pip download --no-deps -d .device-wheels/fallback flax==0.12.12  # see below
#   device run, carry [".device-wheels"], timeout_s 590:  bash benchmarks/gpu_checks.sh [SECONDS]
#
# Each benchmark gets its share of SECONDS (default 480) and writes its JSON (with the
# device name) to $OUT, which the device tool brings back; a benchmark that runs out of
# time is cut off and the next one starts, so one slow case never costs the others
# (each writes its JSON after every case). First the MoE
# grouped-matmul kernels against ragged_dot (correctness and speed: dropless MoE runs them
# on GPU; the MoE MFU case runs with their fastest tiling, or with ragged_dot if they
# failed or differ from it), then MFU per family
# with each case's profile digested (where the device time goes); the traces stay on the
# device, in /tmp.
#
# The device tool brings back at most 8 files from $OUT, so there the JSON and logs are
# written to a folder in /tmp and packed into `$OUT/gpu_checks.tgz` after every benchmark
# (with `summary.txt` beside it): a call cut off by its limit still returns what finished.
# Unpack here with `tar -xzf gpu_checks.tgz -C benchmarks/results`. Without $OUT (run by
# hand) they go to benchmarks/results.
set -u
budget=${1:-480}  # leaves the device call's limit (590 s) room for pip and the kills
out=benchmarks/results
[ -n "${OUT:-}" ] && out=/tmp/jaxarch_gpu_checks
export PYTHONUNBUFFERED=1  # a benchmark cut off by its share keeps its last lines in the log
mkdir -p "$out"
pack() {  # everything so far back to the device tool: one archive and the summary
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/gpu_checks.tgz.part" -C "$out" . \
    && mv "$OUT/gpu_checks.tgz.part" "$OUT/gpu_checks.tgz"
}
summary() {  # a line on the terminal and in summary.txt (in $OUT at once)
  echo "$@" | tee -a "$out/summary.txt"
  [ -z "${OUT:-}" ] || cp "$out/summary.txt" "$OUT/"
}
if compgen -G '.device-wheels/*.whl' > /dev/null; then
  python3 -m pip install -q --no-deps .device-wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The image's flax may not import under its jax (flax 0.12.8 does not under jax 0.11.2) or
# be older than jaxarch needs; then the flax carried in .device-wheels/fallback, if any
# (here: pip download --no-deps -d .device-wheels/fallback flax==0.12.12).
if ! python3 -c 'import jaxarch.models' 2> /dev/null \
    && compgen -G '.device-wheels/fallback/*.whl' > /dev/null; then
  python3 -m pip install -q --no-deps .device-wheels/fallback/*.whl
fi
summary "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
summary "$(python3 -c 'import sys, jax, flax, orbax.checkpoint as ocp
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "orbax", ocp.__version__)' 2>&1 | tail -n 1)"

run() {  # NAME SHARE_PERCENT COMMAND...
  local name=$1 share=$2; shift 2
  local seconds=$(( budget * share / 100 ))
  (( seconds >= 1 )) || seconds=1  # `timeout 0` would not limit it at all
  local start=$SECONDS
  summary "== $name ($seconds s)"
  # The trainer turns SIGTERM into a clean stop and carries on (train/preemption.py), so
  # the benchmarks that train are killed 5 s after it: the share is a hard limit.
  timeout --kill-after=5 "$seconds" "$@" --out="$out/$name.json" > "$out/$name.log" 2>&1
  summary "   exit $? after $(( SECONDS - start )) s; $(tail -n 3 "$out/$name.log" | tr '\n' ' ')"
  pack
}

run grouped_matmul 12 python3 benchmarks/moe.py --tables=matmul   # MoE kernels vs ragged_dot
run mfu 40 python3 benchmarks/mfu.py --steps=10 --profile --profile_dir=/tmp/jaxarch_traces \
    --moe_kernels_from="$out/grouped_matmul.json"       # MoE: the fastest tiling, or ragged_dot
# The rest at the sizes that fit their shares (each saves after every case); their full
# grids, MEGABYTE's equal-compute quality run and BiTA's whole recipe (a trained 151m base,
# distillation, BiTA training: `python benchmarks/bita.py --workdir=DIR`, resumable by
# stage) need calls of their own.
run decode 15 python3 benchmarks/decode.py --batches=1,64 --prompts=2048  # best of 2
run sparse_lookup 12 python3 benchmarks/sparse_lookup.py      # Pallas lookup vs XLA
run moe 9 python3 benchmarks/moe.py --tables=layers           # dropless vs capacity vs dense
run megabyte 12 python3 benchmarks/megabyte.py --seq_lens=8192 --gen_batches=1 --bpb_steps=0
