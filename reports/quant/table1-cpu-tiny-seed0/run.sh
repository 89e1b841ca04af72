#!/bin/bash
# RTN vs GPTQ, INT4 g128, blocks only and with embedding/head, on the table1 cpu-tiny seed-0 checkpoints.
# Usage: bash reports/quant/table1-cpu-tiny-seed0/run.sh transformer looped hyperloop   (venv active)
cd "$(git rev-parse --show-toplevel)"
export OMP_NUM_THREADS=1
for fam in "$@"; do
  ck=runs/reproduce/table1/cpu-tiny/$fam/seed0
  for method in rtn gptq; do
    for emb in "" "--quantize-embeddings"; do
      tag=$method${emb:+-emb}
      hyperloop-lm quantize --checkpoint $ck --method $method --bits 4 --group-size 128 $emb \
        --out runs/quant-table1/$fam-$tag --report reports/quant/table1-cpu-tiny-seed0 2>&1 | grep -v "it/s" | tail -2
    done
  done
done
