#!/usr/bin/env bash
# Zero-shot quality of Gemma-3-270M: teacher and ligerfx variants, lm-eval on the local data sets (GPU).
#   DATA=../shared/data OUTDIR=out bash benchmarks/run_quality.sh
# Every run keeps its per-item scores (--log-samples) in $OUTDIR/paired/<label>/samples, so that any two variants
# can be compared item by item afterwards: python benchmarks/paired.py $OUTDIR/paired/A $OUTDIR/paired/B
# (compare only runs of one code version and one card: bf16 rounding moves single items, docs/RESULTS.md
# "Session 16").
set -u
DATA=${DATA:-../shared/data}
OUTDIR=${OUTDIR:-docs/results/quality}
TASKS=${TASKS:-piqa,arc_easy,arc_challenge,winogrande,hellaswag,lambada_openai}
ADAPTER=examples/adapters/gemma-3-270m-liger-gla
COMPLEMENTARY=examples/adapters/gemma-3-270m-liger-complementary
mkdir -p "$OUTDIR"
run() {  # label, extra args
  local label=$1; shift
  python3 -m ligerfx.cli eval --model gemma-3-270m --data-dir "$DATA" --device cuda --dtype bfloat16 \
    --softmax-dtype float32 --batch-size 64 --tasks "$TASKS" --checks lm_eval --per-task --log-samples \
    --out "/tmp/quality/$label" --label "$label" "$@"
  cp "/tmp/quality/$label/eval.json" "$OUTDIR/$label.json"
  mkdir -p "$OUTDIR/paired/$label" && cp -r "/tmp/quality/$label/samples" "$OUTDIR/paired/$label/"
}
WHICH=${WHICH:-ligerfx,teacher,swa_sinks,gla_untrained,gla_pure_untrained}
for w in ${WHICH//,/ }; do
  case $w in
    ligerfx) run ligerfx --variant gla --adapter "$ADAPTER" ;;
    ligerfx_complementary) run ligerfx_complementary --adapter "$COMPLEMENTARY" ;;
    teacher) run teacher ;;
    swa_sinks) run swa_sinks --variant swa_sinks ;;
    gla_untrained) run gla_untrained --variant gla ;;
    gla_pure_untrained) run gla_pure_untrained --variant gla --mix 1.0 ;;
  esac
done
