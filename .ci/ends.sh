#!/usr/bin/env bash
# The two ends of pyproject.toml's ranges, each in a fresh venv installed by uv:
# - lowest: every direct dependency at its floor (`uv pip install --resolution lowest-direct`; transitive
#   dependencies take their newest allowed versions), checked by `.ci/floors.py --check`;
# - newest: the newest release of each.
# torch is held at the tested CPU build (constraints/tested.txt; a newer torch is a multi-GB CUDA build).
# Each end runs the engine-equivalence tests (every site on every family, attention knockout) and the
# tiny end-to-end workflow, and prints its versions first.
# Usage: bash .ci/ends.sh [lowest|newest]...   (both by default); a failure fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
resolution() {  # resolution END: how uv picks that end's versions (the one list of ends)
  case "$1" in lowest) echo lowest-direct ;; newest) echo highest ;; *) return 1 ;; esac
}
for name in "$@"; do
  resolution "$name" > /dev/null || { echo "ends: unknown end '$name' (lowest, newest)" >&2; exit 2; }
done
PYTHON=${PYTHON:-python3}  # the Python of the venvs (and of uv, where uv is not on PATH)
TORCH="$(grep '^torch==' constraints/tested.txt)+cpu"
# where the CPU build lies: this machine's wheel folder (pip's find-links), else PyTorch's CPU index
if [ -n "${PIP_FIND_LINKS:-}" ]; then TORCH_FROM=(--find-links "$PIP_FIND_LINKS")
else TORCH_FROM=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
# the test extra's pytest and pytest-xdist requirements (its SLURM plugin and py-rattler are not needed)
mapfile -t PYTEST < <(grep '^test = ' pyproject.toml | grep -o '"pytest[^"]*"' | tr -d '"')
TESTS=(tests/test_fast_engine.py tests/test_workflow.py
       -k "every_site or attention_knockout or heatmap_and_divergence or divergence_is_labelled")
SHOWN='^(torch|transformers|accelerate|tokenizers|safetensors|snakemake|xarray|netcdf4|numpy|scipy|matplotlib|pyyaml|jsonschema|tqdm|pandas|huggingface-hub|pytest|pytest-xdist)=='
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT  # an end still testing when another fails stops too

# each test process imports torch and transformers: let Python cache their bytecode in the venv once
# (uv installs none), rather than compile them again in every process (PYTHONDONTWRITEBYTECODE)
unset PYTHONDONTWRITEBYTECODE

UV=${UV:-$(command -v uv || true)}  # `make test-ends` passes the uv of .venv
if [ -z "$UV" ]; then
  "$PYTHON" -m venv "$WORK/uv" && "$WORK/uv/bin/python" -m pip install --quiet uv && UV="$WORK/uv/bin/uv"
fi

install_end() {  # install_end NAME [uv pip install options]: a fresh venv with that end's versions
  local name=$1 venv="$WORK/$1"; shift
  echo "== $name end: installing"
  "$UV" venv --quiet --python "$PYTHON" "$venv"
  echo "$TORCH" > "$WORK/torch.txt"
  "$UV" pip install --quiet --python "$venv/bin/python" "${TORCH_FROM[@]}" \
    -c "$WORK/torch.txt" "$@" -e . "${PYTEST[@]}"
  echo "$name:" $("$UV" pip freeze --python "$venv/bin/python" 2>/dev/null | grep -iE "$SHOWN")
  if [ "$name" = lowest ]; then "$venv/bin/python" .ci/floors.py --check; fi
}

test_end() {  # test_end NAME: two processes, as in `make test`: the workflow runs beside the engine tests
  echo "== $1 end: testing"
  OMP_NUM_THREADS=1 "$WORK/$1/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "${TESTS[@]}"
}

# The ends install one after the other (an editable install builds in the source tree), and each end's
# tests start as soon as it is installed: they run beside the next install and the other end's tests
# (the tests wait on job start-up as much as they compute). Each end's test output is shown when it ends.
ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(lowest newest)
testing=()
for name in "${ends[@]}"; do
  install_end "$name" --resolution "$(resolution "$name")"
  test_end "$name" > "$WORK/$name.log" 2>&1 &
  testing+=($!)
done
failed=()
for i in "${!ends[@]}"; do
  wait "${testing[$i]}" || failed+=("${ends[$i]}")
  cat "$WORK/${ends[$i]}.log"
done
if [ ${#failed[@]} -gt 0 ]; then echo "ends: tests failed at the ${failed[*]} end" >&2; exit 1; fi
