#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one algorithm folder: `make mutate PASS=prune [SAMPLE=100 SEED=17]`
# (not part of `make test`). Installs mutmut on demand, then runs tests/mutation/sample.py, which
# mutates a copy of the committed HEAD (build/mutate/PASS/; the checkout is never touched), runs
# only the folder's tests against each mutant (-x, one child by default), and with SAMPLE checks a
# seeded uniform sample and reports the score with its 95% interval. Results:
# build/mutate/PASS/summary.json; `cd build/mutate/PASS && ../../../.venv/bin/mutmut show NAME`.
set -euo pipefail
PASS=${1:-prune}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$ROOT/.venv/bin
"$BIN/python" -c "import mutmut" 2>/dev/null || "$BIN/pip" install --quiet --disable-pip-version-check "mutmut==3.8.1"
ARGS=(--jobs "${JOBS:-1}")
[ -n "${SAMPLE:-}" ] && ARGS+=(--sample "$SAMPLE")
[ -n "${SEED:-}" ] && ARGS+=(--seed "$SEED")
[ -n "${WORK:-}" ] && ARGS+=(--work "$WORK")
exec "$BIN/python" "$ROOT/tests/mutation/sample.py" "$PASS" "${ARGS[@]}"
