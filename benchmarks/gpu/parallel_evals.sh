#!/usr/bin/env bash
# Several `ligerfx eval` runs at once on ONE GPU (a 270M model leaves an H200 mostly idle: lm-eval's Python side,
# not the GPU, sets the pace), with everything packed into $OUT/results.tgz every 20 s and at the end, so a call
# that runs out of time still returns what finished (the device tool returns at most 8 files from $OUT).
#
#   bash benchmarks/gpu/parallel_evals.sh DEADLINE_S TASKS 'NAME::ARGS' ['NAME::ARGS' ...]
#
# Each NAME::ARGS job runs `ligerfx eval $COMMON ARGS --tasks TASKS --out /tmp/results/NAME`, log in
# /tmp/results/NAME.log. COMMON (env) defaults to the session-16 setup minus the dtype:
#   --model gemma-3-270m --data-dir .carry/data --device cuda --softmax-dtype float32 --batch-size 64
#   --per-task --checks lm_eval --log-samples
# Jobs still running at DEADLINE_S seconds are stopped (their finished tasks are kept: --per-task).
# Example (fp32, both sides of the paired test):
#   bash benchmarks/gpu/parallel_evals.sh 540 piqa,arc_easy 'swa::--dtype float32 --variant swa_sinks' \
#        'comp::--dtype float32 --adapter examples/adapters/gemma-3-270m-liger-complementary'
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 DEADLINE_S TASKS 'NAME::ARGS' ..." >&2; exit 2; }
deadline=$1; tasks=$2; shift 2
R=${RESULTS:-/tmp/results}
OUTDIR=${OUT:-/tmp/out}
mkdir -p "$R" "$OUTDIR"
COMMON=${COMMON:---model gemma-3-270m --data-dir .carry/data --device cuda --softmax-dtype float32 --batch-size 64 --per-task --checks lm_eval --log-samples}

pack() { tar czf "$OUTDIR/results.tgz.tmp" -C "$R" . 2>/dev/null && mv "$OUTDIR/results.tgz.tmp" "$OUTDIR/results.tgz"; }

pids=()
for job in "$@"; do
  name=${job%%::*}; args=${job#*::}
  [ "$name" != "$job" ] || { echo "bad job '$job' (want NAME::ARGS)" >&2; exit 2; }
  # shellcheck disable=SC2086
  ( exec ligerfx eval $COMMON $args --tasks "$tasks" --out "$R/$name" ) > "$R/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name (pid $!): $args"
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader > "$R/gpu.txt" 2>&1 || true

start=$SECONDS
packed=$SECONDS
while :; do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive -eq 1 ] || break
  if (( SECONDS - start >= deadline )); then
    echo "deadline ${deadline}s reached: stopping the jobs still running"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 2; break
  fi
  sleep 1
  if (( SECONDS - packed >= 20 )); then
    pack; packed=$SECONDS
    echo "t=$((SECONDS - start))s: $(ls "$R"/*/eval*.json 2>/dev/null | wc -l) report files"
  fi
done
rc=0
for i in "${!pids[@]}"; do wait "${pids[$i]}"; r=$?; echo "job $((i + 1)) exit $r"; [ $r -eq 0 ] || rc=$r; done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader >> "$R/gpu.txt" 2>&1 || true
pack
for f in "$R"/*.log; do echo "== $f"; tail -n 5 "$f"; done
exit $rc
