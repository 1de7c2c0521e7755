#!/usr/bin/env bash
# The GPU measurements that CPU-only sessions owe, in priority order, as device calls:
#
#   ../shared/tools/device-wheels.sh flatbuffers portpicker threadpoolctl  # here, once: what the device
#   pip wheel --no-deps -w .device-wheels promise              # lacks (grain and tfds need
#   pip download --no-deps -d .device-wheels/fallback flax==0.12.12  # the last two; see below)
#   device run, carry [".device-wheels"], timeout_s 330:  bash benchmarks/gpu_checks.sh 1
#   device run, at once (warm), same carry and limit:     bash benchmarks/gpu_checks.sh 2
#   only with device time left, the same:                 bash benchmarks/gpu_checks.sh 3
#   by hand on a GPU machine, everything (770 s):          bash benchmarks/gpu_checks.sh all
#
# The script installs the wheels itself, with `python3 -m pip` (the image's `pip` belongs to
# another Python), and stops at once if jaxarch does not import. A session's 15 minutes of
# device time hold the machine's start and two such calls, so a first call that fails can
# be fixed and run again instead of the second.
#
# What was measured on an H200 on 2026-12-04 (docs/performance.md) is not run again: dense
# 1.6b MFU, the lookup kernels, decode at batch 1, the MoE layers. The two parts hold what
# issue 13's targets need. Part 1 is MoE: the grouped matmul at the one-GPU case's 16
# experts, the Triton kernels (MoE 680m reached 25.8% MFU with them, target 35%) against
# jax's Mosaic GPU ragged dot (`matmul_impl=mosaic`, never run on a GPU yet), each over its
# tilings, and the two weight-gradient kernels alone; then MoE 680m's MFU with the fastest
# kernels that table found (or the H200's recorded Triton tiling if it found none). Part 2
# is the MFU of UltraMem 680m (target 35%, never measured) and MEGABYTE 151m (its local
# attention on XLA and on cuDNN), UltraMem's key ranking (one top-k against chunks), a
# first run of cuDNN's sliding-window attention, and a compile-only count of the collectives of
# gradient accumulation. MFU runs with XLA's command buffers (CUDA graphs) off, since the
# trace does not attribute their kernels to instructions. Part 3 is decode at batch 64 (MoE
# against UltraMem where the weights read differ), the compile of scanned against unrolled
# layers, MEGABYTE's benchmark, and the grouped matmul at 8 and 64 experts.
# Each benchmark gets its share of the part's SECONDS and writes its JSON (with the device
# name) to $OUT, which the device tool brings back; a benchmark that runs out of time is cut
# off and the next one starts, so one slow case never costs the others (each writes its
# JSON after every case). Compiles are long: 38 s for the dense 1.6b step, 66 s for MoE.
#
# The device tool brings back at most 8 files from $OUT, so there the JSON and logs are
# written to a folder in /tmp and packed into `$OUT/gpu_checks.tgz` after every benchmark
# (with `summary.txt` beside it; part 2's archive holds part 1's files too, when the
# machine stayed warm): a call cut off by its limit still returns what finished.
# Unpack here with `tar -xzf gpu_checks.tgz -C benchmarks/results`. Without $OUT (run by
# hand) they go to benchmarks/results.
set -u
part=${1:-all}
case $part in
  1|2|3|all) ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh [1|2|3|all] [SECONDS]" >&2; exit 2 ;;
esac
out=benchmarks/results
[ -n "${OUT:-}" ] && out=${TMPDIR:-/tmp}/jaxarch_gpu_checks
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
if ! python3 -c 'import jaxarch.train' 2> "$out/import.log"; then  # not worth a share each
  summary "jaxarch does not import: $(tail -n 1 "$out/import.log")"
  pack
  exit 1
fi
summary "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
summary "$(python3 -c 'import sys, jax, flax, orbax.checkpoint as ocp
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "orbax", ocp.__version__)' 2>&1 | tail -n 1)"

# Each part's benchmarks, in order: PART NAME SECONDS COMMAND... A part's seconds add up to
# its default budget (270, 250, 250: each call's limit leaves room for pip and the kills); a
# budget given on the command line scales them all.
plan() {
  run 1 grouped_matmul 100 python3 benchmarks/moe.py --tables=matmul --experts=16
  kernels_from=benchmarks/records/grouped_matmul_h200.json  # unless the table above finished
  [ -s "$out/grouped_matmul.json" ] && kernels_from=$out/grouped_matmul.json
  # MFU with the graphs off (recorded as `xla_flags` in its JSON): a step of 0.3 s barely
  # depends on launch overhead, and the profile can then name the instructions. One call per
  # family, each with its own share: a compile takes 38-66 s, so one family's slow compile
  # (or its kernels failing and the case compiling again on another path) cannot cost the
  # next family's row, as UltraMem's was lost on 2026-12-04.
  XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
    run 1 mfu_moe 170 python3 benchmarks/mfu.py --steps=5 --profile \
      --profile_dir=/tmp/jaxarch_traces --moe_kernels_from="$kernels_from" \
      --cases=moe:680m:16:dots:model.moe.num_experts=16
  XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
    run 2 mfu_ultramem 140 python3 benchmarks/mfu.py --steps=5 --profile \
      --profile_dir=/tmp/jaxarch_traces \
      --cases=ultramem:680m:16:dots:model.ultramem.num_values=262144
  # MEGABYTE's local model attends over patches of 8 bytes with XLA by default; the second
  # case gives it cuDNN's flash attention, whose tiles are 64-128 rows.
  XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
    run 2 mfu_megabyte 70 python3 benchmarks/mfu.py --steps=5 --profile \
      --profile_dir=/tmp/jaxarch_traces \
      --cases=megabyte:151m:8:none,megabyte:151m:8:none:model.megabyte.local.attention_impl=cudnn
  # UltraMem's key ranking (k = 80: a sort of each whole row on a GPU) against the same
  # ranked in chunks (model.ultramem.top_k_chunk).
  run 2 top_k 15 python3 benchmarks/top_k.py
  # cuDNN's sliding window (with the document mask), so far only lowered: against XLA's.
  run 2 attention 15 python3 benchmarks/attention.py
  # Whether XLA's GPU compiler all-reduces accumulated gradients once per step (the CPU one
  # does it per microbatch): compiled only, the one GPU posing as 8 (jax_mock_gpu_topology).
  JAX_MOCK_GPU_TOPOLOGY=1x8x1 \
    run 2 accum_collectives 10 python3 benchmarks/accum_collectives.py --meshes=data8,data2_fsdp4
  # Part 3, for a session with device time left after the first two: the rest at the sizes
  # that fit their shares (each saves after every case). Their full grids, MEGABYTE's
  # equal-compute quality run and BiTA's whole recipe (a trained 151m base, distillation,
  # BiTA training: `python benchmarks/bita.py --workdir=DIR`, resumable by stage) need calls
  # of their own.
  run 3 decode 70 python3 benchmarks/decode.py --batches=64 --prompts=2048 --repeats=1
  # The train step's compile with the layers scanned against unrolled (CPU: 0.21x, dense
  # 680m); a GPU's compile (PTX, autotuning) is longer per instruction.
  run 3 scan_layers 80 python3 benchmarks/scan_layers.py --config=configs/dense.py:680m \
    --steps=3 --config.train.batch_size=16 --config.data.seq_len=1024
  run 3 megabyte 50 python3 benchmarks/megabyte.py --seq_lens=8192 --gen_batches=1 --bpb_steps=0
  run 3 grouped_matmul_8_64 50 python3 benchmarks/moe.py --tables=matmul --experts=8,64
}

run() {  # first pass: add up the chosen part's seconds
  [ "$part" = all ] || [ "$part" = "$1" ] || return 0
  total=$(( total + $3 ))
}
total=0
plan
budget=${2:-$total}  # `all`: 770 s, more than a device call holds; it is for a run by hand
summary "part $part: $budget s"

run() {  # PART NAME SECONDS COMMAND...
  local in_part=$1 name=$2 seconds=$3; shift 3
  [ "$part" = all ] || [ "$part" = "$in_part" ] || return 0
  seconds=$(( budget * seconds / total ))
  (( seconds >= 1 )) || seconds=1  # `timeout 0` would not limit it at all
  local start=$SECONDS
  summary "== $name ($seconds s)"
  # The trainer turns SIGTERM into a clean stop and carries on (train/preemption.py), so
  # the benchmarks that train are killed 5 s after it: the share is a hard limit.
  timeout --kill-after=5 "$seconds" "$@" --out="$out/$name.json" > "$out/$name.log" 2>&1
  summary "   exit $? after $(( SECONDS - start )) s; $(tail -n 3 "$out/$name.log" | tr '\n' ' ')"
  pack
}
plan
