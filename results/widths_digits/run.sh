#!/usr/bin/env bash
# results/widths_digits: a self-supervised teacher made here (data2vec 2.0 on digits: 4 blocks, width 128) distilled
# into 2-block students of its own width (128) and of half its width (64, through the width map), each beside the
# same student not distilled, seeds 0-4; every student linear-probed with cached features, and the teacher too.
# Every arm gets the same data, split, epochs and batch; labels are used by the probes only.
# Run alone on 2 CPU cores (about a quarter of an hour), resumable stage by stage:
#   bash results/widths_digits/run.sh runs/widths_digits
# then keep each stage's config.yaml, metrics.jsonl and summary.json (kdnb.pipeline.export_results does the same).
set -euo pipefail
R=${1:-runs/widths_digits}
K=${KDNB:-kdnb}
SEEDS=${SEEDS:-"0 1 2 3 4"}
done_() { [ -f "$1/summary.json" ] && grep -q '"finished": true' "$1/summary.json"; }
stage() { local out=$1; shift; done_ "$out" || $K "$@" --tensorboard false --resume auto --out_dir "$out"; }
probe() { stage "$1" probe --preset linear_probe_cpu --cache_features true "${@:2}"; }

stage "$R/teacher" pretrain --preset pretrain_cpu --embed_dim 128 --num_heads 4
probe "$R/probe_teacher" --checkpoint "$R/teacher" --depth 4
for s in $SEEDS; do
  for w in 128 64; do
    stage "$R/distill_w${w}_s$s" distill --preset distill_cpu --teacher "run:$R/teacher" --teacher_checkpoint None \
      --teacher_layer_kind auto --model tiny --checkpoint None --depth 2 --embed_dim $w --mlp_dim $((4 * w)) \
      --num_heads 4 --seed $s
    probe "$R/probe_distilled_w${w}_s$s" --checkpoint "$R/distill_w${w}_s$s" --depth 2 --seed $s
    probe "$R/probe_random_w${w}_s$s" --checkpoint None --model tiny --depth 2 --embed_dim $w --num_heads 4 --seed $s
  done
done
