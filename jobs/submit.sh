#!/usr/bin/env bash
# Submit `apr-ray run` to a running Ray cluster (any: KubeRay, `ray up`, a local `ray start --head`).
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh --config small --set data.train_problems=100000
# The repository is the job's working_dir; jobs/runtime_env.yaml installs the GPU stack on the workers.
# Inside the job, apr-ray sees RAY_ADDRESS and joins the cluster instead of starting a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard address, e.g. http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env jobs/runtime_env.yaml -- python -m apr_ray.cli run --no-progress "$@"
