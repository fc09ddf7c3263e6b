#!/usr/bin/env bash
# The GPU checks, run from the repository root on a CUDA machine whose python3 has torch (a lent GPU
# machine or a GPU node's image): the `gpu` tests, then the ranker's GPU benchmark. Nothing is built
# or fetched: wheels of what that machine lacks (pydantic, faiss-cpu, the pinned transformers) may
# lie in .whl/ and are installed beside it; feedserve's folders are mapped to their import paths as
# `pip install -e .` would map them. Results go to $OUT (default /tmp/gpu-checks).
#
#   [RESUME=a cut-short rank_gpu.json] bash scripts/gpu-checks.sh [BENCHMARK BUDGET SECONDS, default 150]
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}
budget=${1:-150}
site=/tmp/feedserve-site
mkdir -p "$out" "$site"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
cat >"$site/sitecustomize.py" <<EOF
# Written by scripts/gpu-checks.sh: feedserve's import paths onto its folders in $PWD.
import importlib.util
import sys

_MAP = {
    "feedserve": "$PWD/ensemble",
    "feedserve.export": "$PWD/export",
    "feedserve.clients": "$PWD/clients",
    "feedserve.training": "$PWD/training",
}


class _Folders:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _MAP:
            return None
        return importlib.util.spec_from_file_location(
            name, _MAP[name] + "/__init__.py", submodule_search_locations=[_MAP[name]]
        )


sys.meta_path.insert(0, _Folders)
EOF
export PYTHONPATH="$site:$PWD"
nvidia-smi -L | tee "$out/machine.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/machine.txt"

# The files that hold gpu tests (the others import what a GPU machine need not have: tritonclient, redis).
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" $(grep -l "mark.gpu" tests/unit/*.py) 2>&1 \
  | tee "$out/pytest-gpu.log"
tests=$?
timeout $((budget + 120)) python3 -m benchmarks.rank_gpu --out "$out/rank_gpu" --budget-s "$budget" ${RESUME:+--resume "$RESUME"} 2>&1 \
  | tee "$out/rank_gpu.log"
bench=$?
echo "gpu tests exit $tests, benchmark exit $bench"
exit $((tests ? tests : bench))
