#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one algorithm folder: `make mutate PASS=prune` (not part of `make test`).
#
# mutmut needs the import name `squeeze` to be a real folder, so the tracked (and untracked, not
# ignored) files are copied to build/mutate/PASS/squeeze/, and a sitecustomize takes the editable
# install of this checkout off the import path there. Only PASS's source files are mutated; the
# tests listed for it run against each mutant (mutmut runs only the tests that reach the mutated
# function). Results: `cd build/mutate/PASS && ../../../.venv/bin/mutmut results` / `mutmut show NAME`.
set -euo pipefail
PASS=${1:-prune}
JOBS=${JOBS:-2}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$ROOT/.venv/bin
WORK=$ROOT/build/mutate/$PASS
case $PASS in
  prune)    SRC="squeeze/compress/passes/prune/*"
            TESTS="squeeze/tests/test_prune.py squeeze/tests/test_algo_mutants.py" ;;
  quantize) SRC="squeeze/compress/passes/quantize/*"
            TESTS="squeeze/tests/test_quant_algos.py squeeze/tests/test_algo_mutants.py squeeze/tests/test_quant.py" ;;
  kernels)  SRC="squeeze/kernels/*"
            TESTS="squeeze/tests/test_kernels.py squeeze/tests/test_quant_algos.py" ;;
  *)        SRC="squeeze/compress/passes/$PASS/*"
            TESTS="squeeze/tests/test_$PASS.py" ;;
esac
"$BIN/python" -c "import mutmut" 2>/dev/null || "$BIN/pip" install --quiet --disable-pip-version-check "mutmut==3.8.1"
rm -rf "$WORK"
mkdir -p "$WORK/squeeze" "$WORK/site"
(cd "$ROOT" && git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T -) | tar -C "$WORK/squeeze" -xf -
cat > "$WORK/site/sitecustomize.py" <<'PY'
import sys  # import squeeze from this copy, not from the editable install of the checkout
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
PY
{
  echo "[mutmut]"
  echo "source_paths=squeeze"
  echo "only_mutate=$SRC"
  echo "pytest_add_cli_args_test_selection=$(echo "$TESTS" | sed 's/ /\n    /g')"
  printf 'pytest_add_cli_args=-p no:randomly\n    -p no:cacheprovider\n    -x\n    -q\n'
} > "$WORK/setup.cfg"
cd "$WORK"
PYTHONPATH="$WORK/site" "$BIN/mutmut" run --max-children "$JOBS" || true
PYTHONPATH="$WORK/site" "$BIN/mutmut" results > results.txt || true
echo "survivors: $(grep -c ': survived' results.txt || true), no tests: $(grep -c ': no tests' results.txt || true) (list: $WORK/results.txt)"
