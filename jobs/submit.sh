#!/usr/bin/env bash
# Submit `apr-ray run` to a running Ray cluster with plain `ray job submit` (`apr-ray submit` does the same
# with the config validated first and --follow mirroring the job's status):
#   RAY_ADDRESS=http://127.0.0.1:8265 STACK=cpu jobs/submit.sh --config small --set data.train_problems=100000
# STACK: gpu (default; CUDA vLLM), cpu (vLLM's CPU build) or none (the cluster's image already holds the stack).
# Ray 2.60 clusters use token auth: the client needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); the mode is turned on here when a token is found.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://127.0.0.1:8265}"
STACK="${STACK:-gpu}"
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] \
    || [ -f "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi
case "$STACK" in
  gpu|cpu) env_args=(--runtime-env "jobs/runtime_env.$STACK.yaml") ;;
  none) env_args=(--runtime-env-json '{"excludes": [".venv", "runs", "mlruns", "mlflow.db", ".git"]}') ;;
  *) echo "STACK=$STACK: expected gpu, cpu or none" >&2; exit 2 ;;
esac
exec ray job submit --address "$RAY_ADDRESS" --working-dir . "${env_args[@]}" \
  -- python -m apr_ray.cli run --no-progress "$@"
