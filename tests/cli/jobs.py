"""Tiny jobs for the CLI tests: data files, a small pretrained folder, job YAMLs, launches.

Every launch uses a fixed port per test and removes the ``/dev/shm`` buffers DeepSpeed's CPU
all-reduce leaves for that port. Runs are judged by the summary the CLI writes, not by the exit
code alone (a rare teardown abort after a written summary must not hide the result).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.launch import BIN, REPO, remove_shm_files

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "sparse", "networks", "prune",
         "and", "freeze", "their", "weights"]


def write_text(path: Path, lines: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "\n" for _ in range(lines)))
    return path


def write_labeled(path: Path, n: int = 64, seed: int = 0) -> Path:
    """JSON lines with ``text`` and a string ``label`` that the text gives away."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["good", "bad"])
        rows.append({"text": f"the film was {label} " * 2, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_gpt2(**extra: Any) -> dict[str, Any]:
    """A ``model`` section: a config-built 2-layer GPT-2 over bytes (~36k parameters)."""
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 257}
    return {"config": {**cfg, **extra}, "task": "causal-lm"}


def write_pretrained_bert(folder: Path) -> Path:
    """A tiny BERT sequence classifier with its tokenizer, saved like a downloaded model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def lm_job(tmp: Path, recipe: Any, deepspeed: str | None, **training: Any) -> dict[str, Any]:
    """A complete causal-LM job on a small text file, 4 optimizer steps."""
    return {
        "model": tiny_gpt2(),
        "data": {"train_files": str(write_text(tmp / "train.txt")), "validation_fraction": 0.1, "max_length": 32},
        "recipe": recipe,
        "deepspeed": deepspeed,
        "training": {
            "output_dir": str(tmp / "out"), "max_steps": 4, "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 2, "save_strategy": "no",
            "report_to": [], "disable_tqdm": True, "seed": 0, **training,
        },
    }


def write_job(tmp: Path, job: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def ds_json(name: str) -> str:
    return str(REPO / "configs" / "deepspeed" / name)


def recipe_file(name: str) -> str:
    return str(REPO / "configs" / name)


def env(tmp: Path) -> dict[str, str]:
    """The launch environment: the repository importable, caches and trackers kept in ``tmp``."""
    return dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def launch(cmds: list[list[str]], tmp: Path, port: int, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start ``cmds`` side by side in the repository root and wait for all; clean ``/dev/shm`` for ``port``."""
    procs = []
    try:
        for i, cmd in enumerate(cmds):
            log = tmp / f"launch{i}.log"
            with open(log, "w") as f:  # the child keeps its own copy of the descriptor
                # Own session: a launch that hangs is stopped with all the ranks it forked.
                proc = subprocess.Popen(cmd, cwd=REPO, env=env(tmp), stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            procs.append((proc, log))
        out = []
        for p, log in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(p)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, log.read_text(errors="replace"), ""))
        return out
    finally:
        for p, _ in procs:
            if p.poll() is None:
                _kill_group(p)
        remove_shm_files(port)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def summary(tmp: Path, procs: list[subprocess.CompletedProcess]) -> dict[str, Any]:
    path = tmp / "out" / "dimred_summary.json"
    assert path.is_file(), "no summary written; launcher output:\n" + "\n".join(p.stdout[-4000:] for p in procs)
    return json.loads(path.read_text())
