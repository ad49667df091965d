#!/usr/bin/env bash
# bench/gpu_check.sh [OUT_DIR] -- the one command for a GPU machine.
#
#   1. installs the wheels in .whl/ if there are any (no network needed: pure-Python peers such
#      as liger-kernel and cut-cross-entropy travel that way);
#   2. runs the test suite compiled on the GPU (no TRITON_INTERPRET), time-boxed; the outcome
#      goes to tests-outcome.txt and the log to tests.log -- failures do not stop the script;
#   3. runs every benchmark with the time that is left (python -m bench --budget-s ...); the
#      results JSON is rewritten after every row, so even a hard stop leaves valid data;
#   4. renders the Markdown table and the PNG plot beside the JSON.
#
# Output folder: $1, else $OUT, else runs/gpu-check. Files (flat): tests.log,
# tests-outcome.txt, bench.log, <date>-<gpu>.json, <date>-<gpu>.md, <date>-<gpu>.png, and
# embed-2b-<date>-<gpu>.json/.md (step 5, embedding throughput, when time is left).
#
# Time (defaults; 8 minutes = 480 s on an H200): wheels ~10 s; tests at most GPU_CHECK_TEST_S
# (170 s, then killed); benchmarks get what is left of GPU_CHECK_TOTAL_S (450 s) minus 30 s for
# the render, with a soft budget 45 s under that hard limit; render ~10 s.
# Environment knobs: GPU_CHECK_TOTAL_S, GPU_CHECK_TEST_S, GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers, 8: Triton compiles are CPU-bound and the H200 machines have 16 cores),
# GPU_CHECK_E2E_LAYERS (28), GPU_CHECK_BENCH_ARGS (extra python -m bench arguments), PYTHON.
# Exit status: 0 when the tests passed and the benchmarks ran; else the first failure's.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/runs/gpu-check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"
TEST_S="${GPU_CHECK_TEST_S:-170}"
TEST_WORKERS="${GPU_CHECK_TEST_WORKERS:-8}"
E2E_LAYERS="${GPU_CHECK_E2E_LAYERS:-28}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}"   # extra arguments for python -m bench (e.g. --only attention,loss)
RENDER_RESERVE_S=30
BENCH_SLACK_S=45
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg

# 1. wheels -------------------------------------------------------------------------------
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  say "installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheel(s) from .whl/"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "wheel install failed: the peers they carry will be reported as not installed"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say "$(nvidia-smi -L 2>/dev/null | head -n 1 || echo 'nvidia-smi not found')"

# 2. tests --------------------------------------------------------------------------------
XDIST=""
if "$PY" -c "import xdist" 2> /dev/null; then XDIST="-n $TEST_WORKERS"; fi
# Kernel tests first (xdist hands tests out roughly in this order), so that a run cut short by the
# limit has still checked the kernels compiled; -v puts every outcome in tests.log as it happens.
# tests/test_sm90_compile.py is left out: it compiles for sm_80/89/90a without a GPU (CI runs it), and
# its ~70 ptxas runs would eat the time the GPU-only tests need.
TESTS="tests/test_attention.py tests/test_linear_cross_entropy.py tests/test_mask.py tests/test_attention_api.py
       tests/test_integration.py tests/ --ignore=tests/test_sm90_compile.py"
say "tests: python -m pytest -v <kernel tests first> tests/ $XDIST (limit ${TEST_S} s)"
t0=$(date +%s)
# shellcheck disable=SC2086
timeout -k 10 "$TEST_S" "$PY" -m pytest -v $TESTS $XDIST -p no:cacheprovider > "$OUT_DIR/tests.log" 2>&1
test_rc=$?
case $test_rc in
  0) outcome="passed" ;;
  1) outcome="failed" ;;
  5) outcome="no tests collected" ;;
  124|137) outcome="timed out after ${TEST_S} s (killed)" ;;
  *) outcome="error (pytest exit status $test_rc)" ;;
esac
{
  echo "outcome: $outcome"
  echo "exit_status: $test_rc"
  echo "seconds: $(( $(date +%s) - t0 ))"
  echo "summary: $(grep -E '[0-9]+ (passed|failed|error|errors|skipped)' "$OUT_DIR/tests.log" | tail -n 1)"
  echo "outcomes so far: $(grep -cE ' PASSED ' "$OUT_DIR/tests.log") passed, $(grep -cE ' (FAILED|ERROR) ' "$OUT_DIR/tests.log") failed or errors"
  echo "command: python -m pytest -v $(echo $TESTS) $XDIST -p no:cacheprovider"
  echo "failures:"
  grep -E '(^| )(FAILED|ERROR) ' "$OUT_DIR/tests.log" | head -n 20
} > "$OUT_DIR/tests-outcome.txt"
say "tests: $outcome"
tail -n 5 "$OUT_DIR/tests.log"

# 3. benchmarks ---------------------------------------------------------------------------
hard=$(( TOTAL_S - $(elapsed) - RENDER_RESERVE_S ))
if (( hard < 90 )); then hard=90; fi
soft=$(( hard - BENCH_SLACK_S ))
say "benchmarks: soft budget ${soft} s, hard limit ${hard} s, e2e layers ${E2E_LAYERS}"
# shellcheck disable=SC2086
timeout -k 10 "$hard" "$PY" -m bench --out "$OUT_DIR" --budget-s "$soft" --e2e-layers "$E2E_LAYERS" $BENCH_ARGS 2>&1 \
  | tee "$OUT_DIR/bench.log" \
  | grep -E '^\[bench\]|^  (attention|loss|e2e) |^python -m bench|^Traceback|^[A-Za-z.]*(Error|Exception)'
bench_rc=${PIPESTATUS[0]}
if (( bench_rc == 124 || bench_rc == 137 )); then
  say "benchmarks stopped at the hard limit; the JSON holds every row finished before"
fi

# 4. render -------------------------------------------------------------------------------
json="$(ls -t "$OUT_DIR"/*.json 2> /dev/null | head -n 1)"
render_rc=1
if [[ -n "$json" ]]; then
  timeout 60 "$PY" -m bench.render "$json" 2>&1 | tee -a "$OUT_DIR/bench.log"
  render_rc=${PIPESTATUS[0]}
  md="${json%.json}.md"
  [[ -f "$md" ]] && cat "$md"
else
  say "no results JSON was written"
fi

# 5. embedding throughput (after the render, which takes the newest JSON): packed vs padded rows,
#    a 2B-shaped model; writes embed-2b-<date>-<gpu>.json/.md. Skipped when no time is left.
left=$(( TOTAL_S + 30 - $(elapsed) ))
if (( left >= 40 )); then
  say "embedding throughput (limit ${left} s)"
  timeout -k 5 "$left" "$PY" -m bench.embed_throughput --model 2b --device cuda --repeats 2 --out "$OUT_DIR" \
    2>&1 | tail -n 8 | tee -a "$OUT_DIR/bench.log"
else
  say "embedding throughput skipped: ${left} s left"
fi

say "done: tests $outcome; benchmarks exit $bench_rc; render exit $render_rc; files in $OUT_DIR"
if (( test_rc != 0 )); then exit "$test_rc"; fi
if (( bench_rc != 0 )); then exit "$bench_rc"; fi
exit "$render_rc"
