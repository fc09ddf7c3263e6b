#!/usr/bin/env bash
# Start feedserve in a container: render the model repository for the variant, make sure the
# TensorRT plan was built for this node's GPU and TensorRT (rebuilt on first start or when its
# metadata no longer matches), then hand the process over to the server.
#
# Environment: FEEDSERVE_VARIANT (gpu-trt | gpu-torch | cpu), FEEDSERVE_ARTIFACTS (a directory
# built by `feedserve build`, mounted read-only), FEEDSERVE_REPOSITORY (writable: the rendered
# repository and the plan), FEEDSERVE_TRT_PRECISION (fp16 | bf16; fp8 needs a Q/DQ graph), FEEDSERVE_LISTEN (the
# address inside the container; compose publishes the ports on the host's loopback only),
# FEEDSERVE_ADMIN_KEY (Triton's admin APIs; default random), FEEDSERVE_WRITE_KEY (what index_write
# requests must carry in the feedserve-write-key header; unset, every write is refused),
# FEEDSERVE_HTTP_PORT (where the stub watchdog reaches the server on loopback, if extra arguments
# move it from 8000), FEEDSERVE_INDEX (local | milvus: the post index in the artifacts' directory,
# or in the Milvus at FEEDSERVE_MILVUS_URI, which every replica shares; docker/k8s). The ranker's
# serving settings, each passed to `feedserve render` as one argument (unset: render's default):
# FEEDSERVE_TASK_WEIGHTS (--task-weights: `feed` for a feed ranker, or a JSON object),
# FEEDSERVE_NEW_POST_BOOST (--new-post-boost), FEEDSERVE_ENGAGEMENT_RETENTION_DAYS.
set -euo pipefail

variant="${FEEDSERVE_VARIANT:-gpu-trt}"
artifacts="${FEEDSERVE_ARTIFACTS:-/artifacts}"
repository="${FEEDSERVE_REPOSITORY:-/models}"
precision="${FEEDSERVE_TRT_PRECISION:-fp16}"
listen="${FEEDSERVE_LISTEN:-0.0.0.0}"
index="${FEEDSERVE_INDEX:-local}"

case "$variant" in
  cpu|gpu-torch|gpu-trt) ;;
  *) echo "feedserve-entrypoint: unknown FEEDSERVE_VARIANT '$variant' (gpu-trt, gpu-torch or cpu)" >&2; exit 2 ;;
esac
case "$index" in
  local) ;;
  milvus)
    if [[ -z "${FEEDSERVE_MILVUS_URI:-}" ]]; then
      echo "feedserve-entrypoint: FEEDSERVE_INDEX=milvus needs FEEDSERVE_MILVUS_URI (e.g. http://milvus:19530)" >&2
      exit 2
    fi ;;
  *) echo "feedserve-entrypoint: unknown FEEDSERVE_INDEX '$index' (local or milvus)" >&2; exit 2 ;;
esac
if [[ ! -f "$artifacts/serving.json" ]]; then
  echo "feedserve-entrypoint: no built artifacts in $artifacts (mount the directory 'feedserve build' wrote)" >&2
  exit 2
fi
export FEEDSERVE_ARTIFACTS="$artifacts"

# Option and value in one word: argparse would read a value such as -1e-3 as an option.
ranker_args=()
if [[ -n "${FEEDSERVE_TASK_WEIGHTS:-}" ]]; then ranker_args+=("--task-weights=$FEEDSERVE_TASK_WEIGHTS"); fi
if [[ -n "${FEEDSERVE_NEW_POST_BOOST:-}" ]]; then ranker_args+=("--new-post-boost=$FEEDSERVE_NEW_POST_BOOST"); fi
if [[ -n "${FEEDSERVE_ENGAGEMENT_RETENTION_DAYS:-}" ]]; then
  ranker_args+=("--engagement-retention-days=$FEEDSERVE_ENGAGEMENT_RETENTION_DAYS")
fi

if [[ "$variant" == cpu ]]; then
  # The CPU image serves through feedserve's own launcher (the tritonserver of the PyPI wheel), from
  # the repository the image ships unless the index or a ranker setting asks for another rendering.
  if [[ "$index" == milvus || ${#ranker_args[@]} -gt 0 ]]; then
    feedserve render --variant cpu --index "$index" "${ranker_args[@]}" --out "$repository"
    serve_args=(--repository "$repository")
    if [[ "$index" == milvus ]]; then serve_args+=(--milvus-uri "$FEEDSERVE_MILVUS_URI"); fi
    exec feedserve --artifacts "$artifacts" serve --host "$listen" --expose "${serve_args[@]}" "$@"
  fi
  exec feedserve --artifacts "$artifacts" serve --host "$listen" --expose "$@"
fi

# Every artifact must match the manifest `feedserve build` wrote (the CPU launcher checks it itself).
python3 -m feedserve.ops.manifest verify "$artifacts"
# With the milvus index the backends read FEEDSERVE_MILVUS_URI from this environment.
feedserve render --variant "$variant" --index "$index" "${ranker_args[@]}" --out "$repository"
if [[ "$variant" == gpu-trt ]]; then
  python3 -m feedserve.export.tensorrt ensure --artifacts "$artifacts" \
    --plan "$repository/encoder/1/model.plan" --precision "$precision"
fi
# Every model loads at start; Triton's admin APIs (load and unload among them) answer only requests
# carrying FEEDSERVE_ADMIN_KEY (unset: a random key). The stub watchdog uses it to reload a python
# model whose stub process died (this Triton neither restarts the stub nor reports the model
# unready); it watches this shell's pid, which exec hands to tritonserver.
export FEEDSERVE_ADMIN_KEY="${FEEDSERVE_ADMIN_KEY:-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}"
admin_apis="model-repository,shared-memory,trace,logging"
watch_host="$listen"; [[ "$listen" == 0.0.0.0 ]] && watch_host=127.0.0.1
python3 -m feedserve.ops.watchdog --server-pid $$ --http-url "$watch_host:${FEEDSERVE_HTTP_PORT:-8000}" \
  --artifacts "$artifacts" --repository "$repository" &
if [[ -z "${FEEDSERVE_WRITE_KEY:-}" ]]; then
  echo "feedserve-entrypoint: FEEDSERVE_WRITE_KEY is not set: index_write will refuse every write" >&2
fi
# index_write reads the write key from the environment and the header from the request's parameters.
exec tritonserver --model-repository="$repository" --model-control-mode=explicit --load-model='*' \
  --http-restricted-api="$admin_apis:feedserve-admin-key=$FEEDSERVE_ADMIN_KEY" \
  --grpc-restricted-protocol="$admin_apis:feedserve-admin-key=$FEEDSERVE_ADMIN_KEY" \
  --http-header-forward-pattern='(?i)^feedserve-write-key$' --grpc-header-forward-pattern='^feedserve-write-key$' \
  --http-address="$listen" --grpc-address="$listen" --metrics-address="$listen" \
  --strict-readiness=true --exit-on-error=true "$@"
