#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine lent for a few minutes: CUDA tests (kernels, Lightning
# training, real models), kernel bandwidth against the HBM roofline, end-to-end overhead (eager and compiled), and
# the MegaBlocks path (built from carried sources while the rest runs). Writes one results file.
#
#   bash benchmarks/gpu_check.sh [results-dir]      # from the repository root; ~8 minutes on an H200 (BUDGET_S caps it)
#
# The GPU machine has torch, Triton, Lightning, transformers and timm but no network. What it lacks travels in the
# repository root (git-ignored): .whl/ (wheels: omegaconf, antlr4-python3-runtime, jsonargparse, hyper-connections,
# torch-einops-utils) and .src/ (sdists: stanford-stk 0.7.1, grouped_gemm 0.3.0, megablocks 0.10.0); see
# benchmarks/README.md for the commands that fetch them. Each section has a time cap; the whole run ends by BUDGET_S.
set -uo pipefail

RESULTS_DIR=${1:-${OUT:-gpu_check_results}}
mkdir -p "$RESULTS_DIR"
RESULTS=$RESULTS_DIR/gpu_check.md
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

section() { printf '\n## %s\n\n' "$1" | tee -a "$RESULTS"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# run CAP_S CMD...: run with a time cap (never past the budget), append its output to the results file
run() {
    local cap=$1 limit
    shift
    limit=$(left)
    ((limit > cap)) && limit=$cap
    if ((limit < 10)); then
        echo "skipped (budget spent): $*" | tee -a "$RESULTS"
        return 0
    fi
    echo "\$ $* (cap ${limit}s)" >>"$RESULTS"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$RESULTS_DIR/full.log" | grep -v -e '^warmed up' -e '^round ' >>"$RESULTS"
    local rc=${PIPESTATUS[0]}
    echo "(exit $rc after $(($(date +%s) - t0)) s)" | tee -a "$RESULTS"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/benchmarks:${PYTHONPATH:-}

build_megablocks() {
    # The documented install path (scripts/install_megablocks.sh), offline from the carried sources, cores 8-15.
    MAX_JOBS=8 taskset -c 8-15 bash scripts/install_megablocks.sh --from .src --target /tmp/megablocks_site
}
if compgen -G ".src/megablocks-*.tar.gz" >/dev/null; then
    (time build_megablocks) >"$RESULTS_DIR/megablocks_build.log" 2>&1 &
    BUILD_PID=$!
fi

echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}" >"$RESULTS"
section "Machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$RESULTS"
$PY -c "import torch, triton, lightning; print('torch', torch.__version__, '| triton', triton.__version__, \
'| lightning', lightning.__version__, '| CUDA', torch.version.cuda)" 2>&1 | tee -a "$RESULTS"

section "CUDA tests (kernels on CUDA, Lightning bf16 training, Triton inside a real model) and real timm models"
run 150 taskset -c 0-7 $PY -m pytest -q -p no:cacheprovider -m cuda tests/ -rfEs --timeout 120
run 45 taskset -c 0-7 $PY -m pytest -q -p no:cacheprovider tests/test_timm.py -rfE

section "End-to-end step overhead, eager"
run 80 taskset -c 0-7 $PY benchmarks/gpu_overhead.py

section "Kernel bandwidth against the HBM roofline (n = 4, bf16)"
run 60 taskset -c 0-7 $PY benchmarks/kernels.py --channels 1280 2560 7168 --streams 4 --tokens 16384

section "Logits kernels at other tile shapes (n = 4, C = 2560, bf16; * = the shape the code picks)"
run 45 taskset -c 0-7 $PY benchmarks/kernels.py --sweep-logits --channels 2560 --streams 4 --tokens 16384

section "MegaBlocks (built from sources against the installed torch)"
if [[ -n ${BUILD_PID:-} ]]; then
    while kill -0 "$BUILD_PID" 2>/dev/null && (($(left) > 45)); do sleep 5; done
    if kill -0 "$BUILD_PID" 2>/dev/null; then
        echo "build still running after $(($(date +%s) - START)) s: stopped, not verified" | tee -a "$RESULTS"
        kill "$BUILD_PID"
    else
        wait "$BUILD_PID" && echo "build succeeded" | tee -a "$RESULTS" || echo "build FAILED" | tee -a "$RESULTS"
    fi
    grep -E '^(real|user)|rror|Successfully' "$RESULTS_DIR/megablocks_build.log" | tail -15 >>"$RESULTS"
    export PYTHONPATH=/tmp/megablocks_site:$PYTHONPATH
    $PY -c "from lightning_mhc.moe import _megablocks_probe as p; print('megablocks probe:', p() or 'available')" \
        2>&1 | tail -3 | tee -a "$RESULTS"
else
    echo "no .src/megablocks-*.tar.gz carried: not built" | tee -a "$RESULTS"
fi
run 40 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_moe.py -rfEs
run 30 $PY benchmarks/moe_backends.py

# Last: compiling the d = 2560 model took more than 100 s in the first run; it gets what is left, up to 200 s.
section "End-to-end step overhead, torch.compile"
run 200 taskset -c 0-7 $PY benchmarks/gpu_overhead.py --compile --rounds 6

echo -e "\nTotal $(($(date +%s) - START)) s" | tee -a "$RESULTS"
