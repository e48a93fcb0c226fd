#!/usr/bin/env bash
# Build MegaBlocks (the GPU MoE backend of lightning_mhc) against the torch already installed, without touching it.
#
#   bash scripts/install_megablocks.sh                      # fetch the sources from PyPI, build, install
#   bash scripts/install_megablocks.sh --from DIR           # offline: DIR holds the three .tar.gz sources
#   bash scripts/install_megablocks.sh --target DIR         # install into DIR (then add it to PYTHONPATH)
#
# `pip install megablocks` would replace your torch: its releases pin torch>=2.7.0,<2.7.1 and numpy<2.1. This
# script installs the three packages MegaBlocks' dropless MoE needs (stanford-stk 0.7.1, grouped_gemm 0.3.0,
# megablocks 0.10.0) with --no-deps --no-build-isolation, so their CUDA extensions compile against your torch and
# nothing else is changed. Needs nvcc (CUDA_HOME), a CUDA build of torch, and a GPU or TORCH_CUDA_ARCH_LIST
# (default here: the visible GPU's architecture, else 9.0).
#
# Two patches to the sources, both only where needed:
# - CUDA 13 ships CUB (CCCL 3) without the `debug_synchronous` argument that megablocks 0.10.0's csrc/cumsum.h
#   passes to cub::DeviceScan; it is dropped (the argument only toggled debug synchronisation).
# - torch >= 2.14's headers refuse anything older than C++20 ("#error C++20 or later compatible compiler is
#   required"), while grouped_gemm 0.3.0 compiles with -std=c++17; it gets -std=c++20 when the headers ask for it.
# When the CUDA toolkit lacks the library headers (a compiler-only toolkit has no cusparse.h), the headers that
# torch's pip wheels carry (site-packages/nvidia/*/include) are added to CPATH.
set -euo pipefail

FROM="" TARGET=()
while (($#)); do
    case $1 in
    --from) FROM=$2; shift 2 ;;
    --target) TARGET=(--target "$2"); shift 2 ;;
    *) echo "unknown argument $1; see the header of $0" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ -z $FROM ]]; then
    FROM=$WORK/sdists
    $PY -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$FROM" \
        stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0
fi
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null ||
        echo 9.0)
    export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-8}

tar xzf "$FROM"/megablocks-0.10.0.tar.gz -C "$WORK"
perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$WORK"/megablocks-0.10.0/csrc/cumsum.h
if grep -q "debug_synchronous))" "$WORK"/megablocks-0.10.0/csrc/cumsum.h; then
    echo "could not patch megablocks csrc/cumsum.h" >&2
    exit 1
fi

TORCH_INCLUDE=$($PY -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
tar xzf "$FROM"/grouped_gemm-0.3.0.tar.gz -C "$WORK"
if grep -q "C++20 or later" "$TORCH_INCLUDE"/ATen/ATen.h; then
    sed -i 's/"-std=c++17"/"-std=c++20"/' "$WORK"/grouped_gemm-0.3.0/setup.py
    grep -q '"-std=c++20"' "$WORK"/grouped_gemm-0.3.0/setup.py || { echo "could not patch grouped_gemm setup.py" >&2; exit 1; }
fi

# The toolkit torch's extension builder will use (CUDA_HOME, else where it finds nvcc).
CUDA_ROOT=$($PY -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
if [[ -z $CUDA_ROOT || ! -e $CUDA_ROOT/include/cuda_runtime_api.h ]]; then
    echo "no CUDA toolkit at CUDA_HOME='$CUDA_ROOT' (torch's guess when unset: two levels above nvcc); set" \
        "CUDA_HOME to the toolkit root, the folder with bin/nvcc and include/cuda_runtime_api.h" >&2
    exit 1
fi
if [[ ! -e $CUDA_ROOT/include/cusparse.h ]]; then
    for dir in "$TORCH_INCLUDE"/../../nvidia/*/include; do
        [[ -d $dir ]] && CPATH=$dir${CPATH:+:$CPATH}
    done
    export CPATH
fi

$PY -m pip install --no-deps --no-build-isolation --no-cache-dir "${TARGET[@]}" \
    "$FROM"/stanford_stk-0.7.1.tar.gz "$WORK"/grouped_gemm-0.3.0 "$WORK"/megablocks-0.10.0
echo "MegaBlocks built against torch $($PY -c 'import torch; print(torch.__version__)')"
