#!/usr/bin/env bash
# Multi30K at equal epochs (issue 17): each model of MODELS trains EPOCHS epochs of Multi30K en→de (configs/
# multi30k-<model>.yaml: paper sizes, batch 64, dropout 0.4, clip 5, 3 bits for the reversible models, the
# plateau schedule: lr x0.5 after an epoch whose val_ppl did not improve) with Adam(lr 1e-3), validates every
# epoch (val_ppl, greedy val_bleu on all 1,014 sentences), then tests the last weights on test2016 with beam 5
# (multi-bleu-style BLEU on the tokenised lower-cased text and sacreBLEU 13a on detokenised output).
# The models run side by side, one thread each (run a pair: one per core).
#
# Usage: [EPOCHS=4] [MODELS="revgru gru"] [NICE=0] bash benchmarks/multi30k_epochs.sh
#   EPOCHS   epochs per model (each ~453 steps; ~18-20 min per epoch per model on one core of this 2-core machine)
#   MODELS   any of: revgru gru revlstm lstm
#   NICE     run the fits at this niceness (19: only the cores' idle time)
#   OUT      output folder (default benchmarks/results/multi30k-epochs)
#   EXTRA    more flags for fit and test, e.g. a smoke run: EXTRA="--trainer.limit_train_batches 3
#            --trainer.limit_val_batches 1 --trainer.limit_test_batches 1"
# Resumable: a killed run continues from <model>/checkpoints/last.ckpt (written every 200 steps and after the last
# batch) when run again with the same EPOCHS; a model whose fit and test finished is skipped. Each fit invocation
# logs to a new <model>/version_N (the summary merges them). The summary (benchmarks/multi30k_epochs_summary.py)
# merges the models into <OUT>/results.json (runs of other models already there are kept), results.md and
# val_bleu.png.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${EPOCHS:-4}"
MODELS="${MODELS:-revgru gru}"
NICE="${NICE:-0}"
EXTRA="${EXTRA:-}"
OUT="${OUT:-benchmarks/results/multi30k-epochs}"
export REVRNN_DATA_DIR="${REVRNN_DATA_DIR:-$PWD/../shared/data}"
export OMP_NUM_THREADS=1
PY="${PY:-.venv/bin/python}"
REVRNN="${REVRNN:-.venv/bin/revrnn}"
mkdir -p "$OUT"

now() { date +%s; }

run_model() {  # fit (or resume) EPOCHS epochs, then test the last weights; wall times into timing.json
  local rnn=$1 dir="$OUT/$1" config="$OUT/$1/config.yaml" resume=() start fitted tested
  mkdir -p "$dir"
  if [ -f "$dir/done" ] && [ "$(cat "$dir/done")" = "$EPOCHS" ]; then
    echo "$rnn: done ($EPOCHS epochs), skipped"; return 0
  fi
  # the config with its log/checkpoint/prediction paths moved under OUT
  sed "s#logs/multi30k-$rnn#$dir#g" "configs/multi30k-$rnn.yaml" > "$config"
  [ -f "$dir/checkpoints/last.ckpt" ] && resume=(--ckpt_path "$dir/checkpoints/last.ckpt")
  start=$(now)
  nice -n "$NICE" "$REVRNN" fit --config "$config" \
    --trainer.max_epochs "$EPOCHS" --trainer.log_every_n_steps 50 --trainer.num_sanity_val_steps 0 \
    --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "$rnn" \
    --trainer.enable_progress_bar false \
    --model.optimizer torch.optim.Adam --model.optimizer.lr 0.001 "${resume[@]}" $EXTRA \
    >> "$OUT/$rnn.log" 2>&1
  fitted=$(now)
  rm -rf "${OUT:?}/$rnn-test"
  nice -n "$NICE" "$REVRNN" test --config "$config" --ckpt_path "$dir/checkpoints/last.ckpt" \
    --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name "$rnn-test" \
    --trainer.enable_progress_bar false $EXTRA \
    >> "$OUT/$rnn.log" 2>&1
  tested=$(now)
  "$PY" -c "import json, sys; s, f, t = map(float, sys.argv[1:4]); json.dump({'epochs': int(sys.argv[4]), \
'last_fit_seconds': f - s, 'test_seconds': t - f}, open(sys.argv[5], 'w'))" \
    "$start" "$fitted" "$tested" "$EPOCHS" "$dir/timing.json"
  echo "$EPOCHS" > "$dir/done"
  echo "$rnn: fit $((fitted - start)) s, test $((tested - fitted)) s"
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
"$PY" benchmarks/multi30k_epochs_summary.py --root "$OUT" --models $MODELS \
  --command "EPOCHS=$EPOCHS MODELS=\"$MODELS\" bash benchmarks/multi30k_epochs.sh"
