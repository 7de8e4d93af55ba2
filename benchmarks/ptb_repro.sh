#!/usr/bin/env bash
# Reproduction run (issue "Language modelling with Lightning"): 1-layer RevGRU (3 bits) and the 1-layer GRU
# baseline on the real PTB, the same number of steps each, paper hyper-parameters (configs/ptb-*.yaml).
# Usage: STEPS=600 [MODELS="revgru gru"] bash benchmarks/ptb_repro.sh   (REVRNN_DATA_DIR must hold ptb/)
# Curves land in benchmarks/results/ptb-repro/<model>/version_*/metrics.csv; summarise with
# python benchmarks/ptb_repro_summary.py.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-600}"
VAL_EVERY="${VAL_EVERY:-150}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for rnn in ${MODELS:-revgru gru}; do
  .venv/bin/revrnn fit --config "configs/ptb-$rnn.yaml" \
    --trainer.max_steps "$STEPS" --trainer.val_check_interval "$VAL_EVERY" \
    --trainer.logger.init_args.save_dir benchmarks/results/ptb-repro \
    --trainer.enable_progress_bar false \
    --trainer.default_root_dir benchmarks/results/ptb-repro/$rnn \
    > "benchmarks/results/ptb-repro/$rnn.log" 2>&1 &
done
wait
