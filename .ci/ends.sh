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
trap 'rm -rf "$WORK"' EXIT

UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  "$PYTHON" -m venv "$WORK/uv" && "$WORK/uv/bin/python" -m pip install --quiet uv && UV="$WORK/uv/bin/uv"
fi

end() {  # end NAME [uv pip install options]
  local name=$1 venv="$WORK/$1"; shift
  echo "== $name end: installing"
  "$UV" venv --quiet --python "$PYTHON" "$venv"
  echo "$TORCH" > "$WORK/torch.txt"
  "$UV" pip install --quiet --python "$venv/bin/python" "${TORCH_FROM[@]}" \
    -c "$WORK/torch.txt" "$@" -e . "${PYTEST[@]}"
  echo "$name:" $("$UV" pip freeze --python "$venv/bin/python" 2>/dev/null | grep -iE "$SHOWN")
  if [ "$name" = lowest ]; then "$venv/bin/python" .ci/floors.py --check; fi
  echo "== $name end: testing"
  # two processes, as in `make test`: the workflow runs beside the engine tests
  OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "${TESTS[@]}"
}

ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(lowest newest)
for name in "${ends[@]}"; do
  case "$name" in
    lowest) end lowest --resolution lowest-direct ;;
    newest) end newest --resolution highest ;;
    *) echo "ends: unknown end '$name' (lowest, newest)" >&2; exit 2 ;;
  esac
done
