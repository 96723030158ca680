#!/usr/bin/env bash
# Builds run_pt2 (a C++ runner of exported .pt2 detectors) against the installed torch's libtorch.
#   bash tools/cpp/build.sh [OUTPUT]        # default: tools/cpp/run_pt2; the compiler is $CXX or g++
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
torch_dir=$("$python" -c "import os, torch; print(os.path.dirname(torch.__file__))")
abi=$("$python" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
"${CXX:-g++}" -O2 -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/run_pt2.cpp" \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
    -L"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$torch_dir/lib" -o "${1:-$here/run_pt2}"
