#!/usr/bin/env bash
# The GPU measurements that CPU-only sessions owe, in priority order, as one device call:
#
#   ../shared/tools/device-wheels.sh flatbuffers         # here, once: wheels the device lacks
#   device run, carry [".device-wheels"]:  bash benchmarks/gpu_checks.sh [SECONDS]
#
# Each benchmark gets its share of SECONDS (default 480) and writes its JSON (with the
# device name) to $OUT, which the device tool brings back; a benchmark that runs out of
# time is cut off and the next one starts, so one slow case never costs the others.
set -u
budget=${1:-480}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if compgen -G '.device-wheels/*.whl' > /dev/null; then
  python3 -m pip install -q --no-deps .device-wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"

run() {  # NAME SHARE_PERCENT COMMAND...
  local name=$1 share=$2; shift 2
  local seconds=$(( budget * share / 100 ))
  echo "== $name ($seconds s)"
  timeout "$seconds" "$@" --out="$out/$name.json" > "$out/$name.log" 2>&1
  echo "   exit $? ; $(tail -n 3 "$out/$name.log" | tr '\n' ' ')"
}

run mfu 45 python3 benchmarks/mfu.py --steps=10               # issue 13: MFU per family
run decode 15 python3 benchmarks/decode.py                    # UltraMem vs MoE decoding
run sparse_lookup 10 python3 benchmarks/sparse_lookup.py      # Pallas lookup vs XLA
run moe 10 python3 benchmarks/moe.py                          # dropless vs capacity
run megabyte 10 python3 benchmarks/megabyte.py                # MEGABYTE vs byte transformer
run bita 10 python3 benchmarks/bita.py                        # accepted tokens per pass
