"""Demo: train a small GPT-2 on real text with 90% of its weights pruned, under DDP on CPU.

Launch as several local processes (gloo)::

    python -m torch.distributed.run --nproc_per_node 2 --master_port 29517 scripts/train_lm.py --max-steps 1000

The model is a randomly initialised 2-layer GPT-2 (n_embd 128) trained as a byte-level causal LM
on Debian's fortunes corpus (see ``fortunes_data.py``). The recipe (static random pruning, ERK
budgets, by default) is applied by :class:`dimred_dist.DimRedManager` before DDP wraps the model;
every rank computes the same masks from the recipe's seed, so nothing is broadcast, and
``check_agreement`` verifies that once after set-up and once at the end.

Rank 0 prints progress and writes to ``--output-dir``: ``summary.json`` (losses, timings, per-layer
densities, the largest |w| over pruned entries), ``model.pt`` (the model's state dict) and
``dimred_state.pt`` (the manager's state dict: masks and step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from fortunes_data import VOCAB_SIZE, decode, load_fortunes
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import dimred_dist

REPO = Path(__file__).resolve().parent.parent
N_POSITIONS = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=128, help=f"tokens per sequence (at most {N_POSITIONS})")
    p.add_argument("--recipe", default=str(REPO / "configs" / "static_erk_random_90.yaml"), help="recipe YAML")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "train_lm"), help="where rank 0 writes results")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up, then cosine decay to 10%%")
    p.add_argument("--log-every", type=int, default=10, help="print the training loss every N steps")
    p.add_argument("--val-blocks", type=int, default=512, help="validation blocks evaluated (0: all)")
    p.add_argument("--sample-tokens", type=int, default=160, help="bytes sampled from the model at the end (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order")
    args = p.parse_args(argv)
    if not 2 <= args.seq_len <= N_POSITIONS:
        p.error(f"--seq-len must be in [2, {N_POSITIONS}], got {args.seq_len}")
    if args.max_steps < 1 or args.batch_size < 1 or args.log_every < 1:
        p.error("--max-steps, --batch-size and --log-every must be >= 1")
    return args


def build_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)  # every rank builds the same initial weights (DDP would broadcast them anyway)
    config = GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        n_positions=N_POSITIONS,
        vocab_size=VOCAB_SIZE,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
        # A few hundred steps on 2.5 MB of text underfit; dropout would only slow the demo down.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, minus a warning per rank
    return model


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def batches(blocks: torch.Tensor, batch_size: int, seed: int):
    """Endless iterator over this rank's shard, reshuffled every epoch."""
    ds = TensorDataset(blocks)
    sampler = DistributedSampler(ds, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for (x,) in loader:
            yield x
        epoch += 1


def mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


@torch.no_grad()
def validation_loss(model: GPT2LMHeadModel, val: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over the validation blocks, each rank taking every world_size-th block."""
    model.eval()
    mine = val[dist.get_rank() :: dist.get_world_size()]
    total = torch.zeros(2, dtype=torch.float64)  # (sum of per-block mean losses, blocks)
    for i in range(0, len(mine), batch_size):
        x = mine[i : i + batch_size]
        total += torch.tensor([model(input_ids=x, labels=x).loss.item() * len(x), len(x)], dtype=torch.float64)
    dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def layer_report(manager: dimred_dist.DimRedManager, model: torch.nn.Module) -> dict[str, dict]:
    """Per managed layer: shape, kept entries (actual and target) and the largest |w| over pruned entries."""
    metrics = manager.metrics()  # collective: every rank calls it
    out = {}
    for name, ps in manager.state.params.items():
        w = model.get_parameter(name).detach().reshape(-1)
        pruned = ~ps.keep
        out[name] = {
            "shape": list(ps.shape),
            "numel": ps.numel,
            "kept": int(ps.keep.sum()),
            "target_kept": int(manager.ctx.keep_counts[name]),
            "density": metrics[f"dimred/density/{name}"],
            "max_abs_pruned": float(w[pruned].abs().max()) if bool(pruned.any()) else 0.0,
        }
    return out


def print_layers(layers: dict[str, dict]) -> None:
    print(f"{'managed parameter':<34} {'shape':>12} {'numel':>8} {'kept':>7} {'density':>8} {'max|w| pruned':>14}")
    for name, r in layers.items():
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{name:<34} {shape:>12} {r['numel']:>8} {r['kept']:>7} {r['density']:>8.4f} {r['max_abs_pruned']:>14.1f}"
        )


def _identical_across_ranks(tensors: dict[str, torch.Tensor]) -> bool:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


def weights_identical_across_ranks(model: torch.nn.Module) -> bool:
    return _identical_across_ranks(model.state_dict())


def masks_identical_across_ranks(manager: dimred_dist.DimRedManager) -> bool:
    return _identical_across_ranks(manager.state.state_dict())


@torch.no_grad()
def sample(model: GPT2LMHeadModel, prompt: bytes, n: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    model.eval()
    for _ in range(n):
        logits = model(input_ids=torch.tensor([tokens[-N_POSITIONS:]])).logits[0, -1]
        tokens.append(int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=gen)))
    model.train()
    return decode(tokens)


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)

    data = load_fortunes(args.seq_len)
    val = data.val[: args.val_blocks] if args.val_blocks else data.val
    model = build_model(args.seed)
    recipe = dimred_dist.load_recipe(args.recipe)
    manager = dimred_dist.DimRedManager(recipe, model, total_steps=args.max_steps).prepare()
    manager.check_agreement()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.01)
    manager.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps))

    n_params = sum(p.numel() for p in model.parameters())
    n_managed = sum(ps.numel for ps in manager.state.params.values())
    log(
        f"fortunes: {data.n_files} topic files, {data.n_entries} entries -> {len(data.train)} train / "
        f"{len(data.val)} validation blocks of {args.seq_len} bytes"
    )
    log(
        f"model: GPT-2 2x128, {n_params:,} parameters, {n_managed:,} managed by recipe {Path(args.recipe).name} "
        f"({recipe.method}, sparsity {recipe.sparsity}, {recipe.distribution})"
    )
    log(f"world size {world} (gloo DDP), batch {args.batch_size} x {args.seq_len} per rank, {args.max_steps} steps")
    layers = layer_report(manager, model)
    if rank == 0:
        print_layers(layers)
    val_before = validation_loss(model, val, 4 * args.batch_size)
    log(f"validation loss before training: {val_before:.4f} (uniform over bytes: {math.log(VOCAB_SIZE):.4f})")

    history, window = [], []
    data_iter = batches(data.train, args.batch_size, args.seed)
    t_train = time.perf_counter()
    for step in range(1, args.max_steps + 1):
        x = next(data_iter)
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps:
            (mean,) = mean_over_ranks([sum(window) / len(window)])
            history.append([step, mean])
            window = []
            log(
                f"step {step:>5}  loss {mean:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - t_train:6.1f}s"
            )
    train_seconds = time.perf_counter() - t_train

    val_after = validation_loss(model, val, 4 * args.batch_size)
    manager.check_agreement()
    masks_identical = masks_identical_across_ranks(manager)
    layers = layer_report(manager, model)
    metrics = manager.metrics()
    identical = weights_identical_across_ranks(model)
    max_pruned = max(r["max_abs_pruned"] for r in layers.values())
    summary = {
        "steps": args.max_steps,
        "world_size": world,
        "batch_size_per_rank": args.batch_size,
        "seq_len": args.seq_len,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "tokens_per_second": args.max_steps * world * args.batch_size * args.seq_len / train_seconds,
        "initial_val_loss": val_before,
        "final_val_loss": val_after,
        "final_train_loss": history[-1][1],
        "loss_history": history,
        "recipe": recipe.to_dict(),
        "model_params": n_params,
        "managed_params": n_managed,
        "overall_density": metrics["dimred/density"],
        "max_abs_pruned": max_pruned,
        "weights_identical_across_ranks": identical,
        "masks_identical_across_ranks": masks_identical,
        "layers": layers,
    }
    if rank == 0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save(model.state_dict(), out / "model.pt")
        torch.save(manager.state_dict(), out / "dimred_state.pt")
        print(f"validation loss after {args.max_steps} steps: {val_after:.4f} (before: {val_before:.4f})")
        if args.sample_tokens:
            print("sample (prompt 'The '):\n" + sample(model, b"The ", args.sample_tokens, args.seed).rstrip())
        print_layers(layers)
        print(
            f"done: {args.max_steps} steps in {train_seconds:.1f}s training, {summary['total_seconds']:.1f}s total; "
            f"{summary['tokens_per_second']:,.0f} tokens/s; overall density {summary['overall_density']:.4f}; "
            f"max |w| over pruned entries {max_pruned}; weights identical across ranks: {identical}; "
            f"results in {out}"
        )
    dist.barrier()
    dist.destroy_process_group()
    if max_pruned != 0.0 or not identical or not masks_identical:
        raise SystemExit(
            f"invariant violated: max |w| over pruned = {max_pruned}, weights identical across ranks = {identical}, "
            f"masks identical across ranks = {masks_identical}"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
