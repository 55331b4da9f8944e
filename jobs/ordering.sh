#!/usr/bin/env bash
# The APR-vs-serial ordering, small (docs/results.md, "APR vs SoS+"): an APR model and an SoS+ model trained
# with the same SFT compute on the same problems, then swept side by side (`apr-ray eval --sweep`).
#   jobs/ordering.sh                  # 2 CPU cores, 47 min: two ~20-minute SFT runs, then a 6-minute sweep
#   OUT=runs/ord2 SEED=1 jobs/ordering.sh
# A model already trained under $OUT is reused, so a stopped run continues with what is missing.
#
# Same compute: both train 6,000 steps of the tiny-long schedule on the forward tokens of one step matched
# (APR 19 thread sequences of ~111 tokens, SoS+ 8 traces of ~263: ~2,100 tokens a step each). The APR
# demonstrations use beams of at most 3 (root and children): with the reference's 10 and 15 a root thread
# of a 3-number problem holds more tokens than the whole serial trace, and no window favours APR (the
# demonstrations' own curves are in docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/ordering}"
SEED="${SEED:-0}"
PY="${PY:-.venv/bin/python}"
# Random number embeddings and the 2026-12-02 schedule (a 100-step drop to 0.15x at step 5,000): what the
# figures in docs/results.md were measured with.
COMMON=(--config tiny-long --set "seed=$SEED" --set sft.eval_every=0 --set model.number_embedding=random
        --set sft.learner.decay_start=5000 --set sft.learner.decay_steps=5100 --set sft.learner.min_lr_ratio=0.15)
APR=(--set data.demos.solver.apr_max_beam=3 --set data.demos.solver.apr_max_sub_beam=3 --set sft.batch_sequences=19)
SOSP=(--set data.demos.kind=sosp --set sft.batch_sequences=8)

train() {  # name, overrides...
  local name="$1"; shift
  if [ -f "$OUT/$name/sft/model/config.json" ]; then
    echo "ordering: reusing $OUT/$name/sft/model"
    return
  fi
  "$PY" -m apr_ray.plain --no-progress "${COMMON[@]}" --set "output_dir=$OUT/$name" "$@"
}

start=$(date +%s)
train apr "${APR[@]}"
train sosp "${SOSP[@]}"
"$PY" -m apr_ray.cli eval --sweep --no-progress --config tiny-long --set "seed=$SEED" --set "output_dir=$OUT/sweep" \
  --set eval.sweep.children='[1,2,3]' --model "$OUT/apr/sft/model" --baseline "$OUT/sosp/sft/model"
echo "ordering: $(( ($(date +%s) - start) / 60 )) min in all; tables and plots under $OUT/sweep/eval/sweep"
