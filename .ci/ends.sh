#!/usr/bin/env bash
# The two ends of pyproject.toml's ranges, each in a fresh venv: `lowest` pins every direct dependency
# at its floor (.ci/floors.py; transitive dependencies take their newest allowed versions, like uv's
# --resolution lowest-direct), `newest` takes the newest release of each. torch is the tested CPU build
# on this machine's disk in both (a newer torch is a multi-GB CUDA build). Each runs the engine-equivalence
# tests (every site, and attention knockout, on every family) and the tiny end-to-end workflow.
# Usage: bash .ci/ends.sh [lowest|newest]...   (both by default); a failure fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # makes the venvs
# FLOORS_PYTHON: a Python with `packaging` to read pyproject.toml (make test-ends passes .venv's)
TORCH=$(grep '^torch==' constraints/tested.txt)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TESTS=(tests/test_fast_engine.py tests/test_workflow.py
       -k "every_site or knockout or heatmap_and_divergence or divergence_is_labelled")

end() {  # end NAME CONSTRAINTS-FILE
  local venv="$WORK/$1"
  echo "== $1 end: installing"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$TORCH"
  "$venv/bin/python" -m pip install --quiet -c "$2" -e . pytest
  "$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|transformers|tokenizers|safetensors|snakemake|xarray|netcdf4|numpy|scipy|matplotlib|pyyaml|jsonschema|tqdm|pandas|pytest)==' \
    | tr '\n' ' '; echo
  echo "== $1 end: testing"
  OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
}

ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(lowest newest)
for name in "${ends[@]}"; do
  case "$name" in
    lowest) "${FLOORS_PYTHON:-$PYTHON}" .ci/floors.py --torch "$TORCH" --extra test > "$WORK/lowest.txt" ;;
    newest) echo "$TORCH" > "$WORK/newest.txt" ;;
    *) echo "ends: unknown end '$name' (lowest, newest)" >&2; exit 2 ;;
  esac
  end "$name" "$WORK/$name.txt"
done
