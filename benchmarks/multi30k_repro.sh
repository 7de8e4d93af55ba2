#!/usr/bin/env bash
# Reproduction run (issue 8): RevGRU Emb+20H (3 bits) and the nn.GRU baseline (300H) on Multi30K en→de, the
# same number of optimizer steps each, paper hyper-parameters (configs/multi30k-{revgru,gru}.yaml: batch 64,
# SGD lr 0.2, clip 5, dropout 0.4), then test2016 BLEU with beam 5 (the paper's multi-bleu-style BLEU on the
# tokenised lower-cased text, and sacreBLEU 13a on detokenised output).
#
# Usage: [STEPS=N] [MODELS="revgru gru"] [VAL_EVERY=0] [TEST_BATCHES=1.0] [LOG_EVERY=50] \
#        bash benchmarks/multi30k_repro.sh
#   STEPS         optimizer steps per model (default 453 = one epoch of Multi30K at batch 64: about 30 minutes
#                 in all on 2 shared CPU cores, the two models side by side on one thread each. Measured with
#                 STEPS=20 and 40 on a busy 2-core machine: ~1.9 s/step GRU, ~2.6 s/step RevGRU, plus ~60-70 s
#                 start-up per fit; test on all of test2016 with beam 5 takes a few minutes per model)
#   VAL_EVERY     validate (val_ppl, greedy val_bleu on 1,014 sentences) every N steps; 0: no validation
#                 (the learning-rate halving then never triggers; in under one epoch it would not anyway)
#   TEST_BATCHES  Lightning's limit_test_batches: 1.0 = all of test2016 (16 batches of ~63 sentences), a
#                 fraction = that share (0.125: 2 batches, for smoke runs), an integer >= 2 = that many batches
#                 (the CLI reads "1" as 1.0: all of them)
#   LOG_EVERY     log (and MemoryReport-measure) every N steps
#   EXTRA         more `revrnn fit` flags for both models, e.g. the optimiser of the short run in the README:
#                 EXTRA="--model.optimizer torch.optim.Adam --model.optimizer.lr 0.001"
#   OUT           output folder (default benchmarks/results/multi30k-repro)
#   REVRNN_DATA_DIR  the shared data folder holding multi30k/tok/ (default ../shared/data)
# Output under benchmarks/results/multi30k-repro/: <model>/version_0/ (fit: metrics.csv, memory_report.json,
# checkpoints/last.ckpt), <model>-test/version_0/metrics.csv (test), <model>/timing.json, <model>.log, and the
# summary results.md + results.json (benchmarks/multi30k_repro_summary.py; also run alone to re-summarise).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-453}"
MODELS="${MODELS:-revgru gru}"
VAL_EVERY="${VAL_EVERY:-0}"
TEST_BATCHES="${TEST_BATCHES:-1.0}"
LOG_EVERY="${LOG_EVERY:-50}"
OUT="${OUT:-benchmarks/results/multi30k-repro}"
EXTRA="${EXTRA:-}"
export REVRNN_DATA_DIR="${REVRNN_DATA_DIR:-$PWD/../shared/data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-.venv/bin/python}"
REVRNN="${REVRNN:-.venv/bin/revrnn}"
mkdir -p "$OUT"

if [ "$VAL_EVERY" -gt 0 ]; then
  VAL_FLAGS=(--trainer.val_check_interval "$VAL_EVERY" --trainer.check_val_every_n_epoch null
             --trainer.num_sanity_val_steps 0)
else
  VAL_FLAGS=(--trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0)
fi

now() { date +%s.%N; }

run_model() {  # fit STEPS steps, then test the last checkpoint; wall times into timing.json
  local rnn=$1 config="configs/multi30k-$1.yaml" start fitted tested
  rm -rf "${OUT:?}/$rnn" "${OUT:?}/$rnn-test"
  mkdir -p "$OUT/$rnn"
  start=$(now)
  "$REVRNN" fit --config "$config" \
    --trainer.max_steps "$STEPS" --trainer.log_every_n_steps "$LOG_EVERY" "${VAL_FLAGS[@]}" \
    --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "$rnn" \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$OUT/$rnn" \
    --model.prediction_file "$OUT/$rnn/predictions.de" $EXTRA \
    > "$OUT/$rnn.log" 2>&1
  fitted=$(now)
  "$REVRNN" test --config "$config" --ckpt_path "$OUT/$rnn/version_0/checkpoints/last.ckpt" \
    --trainer.limit_test_batches "$TEST_BATCHES" \
    --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "$rnn-test" \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$OUT/$rnn-test" \
    --model.prediction_file "$OUT/$rnn/predictions.de" \
    >> "$OUT/$rnn.log" 2>&1
  tested=$(now)
  "$PY" -c "import json, sys; s, f, t, n = map(float, sys.argv[1:5]); json.dump({'steps': int(n), \
'fit_seconds': f - s, 'test_seconds': t - f}, open(sys.argv[5], 'w'))" \
    "$start" "$fitted" "$tested" "$STEPS" "$OUT/$rnn/timing.json"
  echo "$rnn: fit $(awk "BEGIN {print $fitted - $start}") s, test $(awk "BEGIN {print $tested - $fitted}") s"
}

pids=()
for rnn in $MODELS; do
  run_model "$rnn" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  echo "a run failed: see $OUT/<model>.log" >&2
  exit 1
fi
# shellcheck disable=SC2086  # MODELS is a word list
"$PY" benchmarks/multi30k_repro_summary.py --root "$OUT" --models $MODELS \
  --command "STEPS=$STEPS VAL_EVERY=$VAL_EVERY TEST_BATCHES=$TEST_BATCHES${EXTRA:+ EXTRA=\"$EXTRA\"} bash benchmarks/multi30k_repro.sh" \
  --test-batches "$TEST_BATCHES"
