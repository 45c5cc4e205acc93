"""The catalogue of bad inputs: each gets a one-line error that names the value, before any training state
is written, and no file that was in the output folder changes.

Each case edits a valid tiny job (GPT-2 over bytes, RigL at 90%) and runs ``dimred-train`` in-process
(no ``--check``: a case that slipped through validation would start training and write into the
output folder). DeepSpeed cases run ``--check`` as the ``deepspeed`` launcher's rank 0 would.
Checkpoint cases resume from a dimred checkpoint of this model that was damaged after its save.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import sys
from pathlib import Path

import pytest
import torch

import dimred_dist as dd
from dimred_dist.cli.train import main
from dimred_dist.distributed.checkpoint import save_dimred_state
from tests.cli.jobs import ds_json, lm_job, tiny_gpt2, write_job

DS_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))


def _set(job: dict, dotted: str, value) -> None:
    node = job
    *parts, last = dotted.split(".")
    for p in parts:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(last)
    else:
        node[last] = value


DELETE = object()
RIGL = {"method": "rigl", "sparsity": 0.9, "targets": {"exclude": ["wpe"]}}

# (id, edits {dotted key: value}, fragment the error must contain)
CASES = [
    ("string for list", {"recipe.targets.include": "attn"}, "targets.include must be a list of strings, got 'attn'"),
    ("string for bool", {"recipe.targets.biases": "maybe"}, "targets.biases must be true or false, got 'maybe'"),
    ("string module types", {"recipe.targets.module_types": "Linear"}, "module_types must be a list of strings"),
    ("string freeze", {"recipe.freeze": "wte"}, "freeze must be a list of regular expressions, got 'wte'"),
    ("empty layers", {"recipe.sparsity": 0.99999, "recipe.distribution": "uniform"}, "keeps 0 entries of"),
    ("sparsity string", {"recipe.sparsity": "0.9"}, "sparsity must be a number, got '0.9'"),
    ("sparsity range", {"recipe.sparsity": 1.5}, "sparsity must be in [0, 1), got 1.5"),
    ("method typo", {"recipe.method": "rigll"}, "unknown method 'rigll'"),
    ("distribution", {"recipe.distribution": "gauss"}, "unknown sparsity distribution 'gauss'"),
    ("seed", {"recipe.seed": -1}, "seed must be a non-negative integer, got -1"),
    ("fractional interval", {"recipe.schedule": {"kind": "periodic", "interval": 2.5}}, "interval must be an integer"),
    ("schedule decay", {"recipe.schedule": {"kind": "periodic", "interval": 10, "decay": 3}}, "decay must be"),
    ("schedule kind", {"recipe.schedule": {"kind": "sometimes"}}, "unknown schedule kind 'sometimes'"),
    ("args key", {"recipe.args": {"grow": "random"}}, "unknown key(s) ['grow']"),
    ("include matches nothing", {"recipe.targets.include": ["attn_typo"]}, "pattern 'attn_typo' matches no parameter"),
    ("freeze matches nothing", {"recipe.freeze": ["wtee"]}, "pattern 'wtee' matches no parameter"),
    ("bad regex", {"recipe.targets.include": ["(["]}, "invalid regular expression '(['"),
    ("recipe key typo", {"recipe.sparsty": 0.9}, "unknown key(s) ['sparsty']"),
    ("recipe file missing", {"recipe": "/nonexistent/recipe.yaml"}, "/nonexistent/recipe.yaml"),
    ("learning rate text", {"training.learning_rate": "fast"}, "training.learning_rate must be a number"),
    ("fractional max_steps", {"training.max_steps": 2.5}, "training.max_steps must be an integer"),
    ("bool text", {"training.bf16": "maybe"}, "training.bf16 must be true or false"),
    ("training key typo", {"training.learnin_rate": 1e-3}, "unknown key(s) ['learnin_rate']"),
    ("reserved key", {"training.optim": "adamw_torch"}, "training.optim: set by dimred-train"),
    ("YAML boolean", {"training.save_strategy": False}, "training.save_strategy: got the boolean False"),
    ("no output_dir", {"training.output_dir": DELETE}, "training.output_dir is required"),
    ("fractional limit", {"training.save_total_limit": 1.5}, "training.save_total_limit must be an integer or null"),
    ("data file missing", {"data.train_files": "/nonexistent/*.txt"}, "no file matches '/nonexistent/*.txt'"),
    ("max_length", {"data.max_length": 1}, "data.max_length must be an integer >= 2, got 1"),
    ("validation fraction", {"data.validation_fraction": 1.5}, "validation_fraction must be in [0, 1), got 1.5"),
    ("data format", {"data.format": "parquet"}, "unknown format 'parquet'"),
    ("text column", {"data.text_column": "body"}, "text files have one column"),
    ("model type", {"model.config.model_type": "gpt5"}, "unknown model type 'gpt5'"),
    ("model key typo", {"model.config.n_layers": 2}, "unknown key(s) ['n_layers']"),
    ("task", {"model.task": "translation"}, "unknown task 'translation'"),
    ("positions", {"data.max_length": 128}, "data.max_length=128 exceeds the model's 64 positions"),
    ("job section typo", {"trainng": {}}, "unknown key(s) ['trainng']"),
    ("nonfinite limit", {"max_nonfinite_steps": -1}, "max_nonfinite_steps must be >= 0, got -1"),
    ("deepspeed missing", {"deepspeed": "/nonexistent/ds.json"}, "DeepSpeed config not found: /nonexistent/ds.json"),
]
DS_CASES = [
    ("top-level typo", {"gradient_clippin": 1.0}, "unknown key 'gradient_clippin': did you mean 'gradient_clipping'"),
    ("zero typo", {"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5e5}},
     "zero_optimization.reduce_bucket_sise"),
    ("optimizer section", {"optimizer": {"type": "AdamW"}}, 'an "optimizer" section'),
    ("stage", {"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4"),
    ("batch conflict", {"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu=7"),
]


@pytest.fixture
def base(tmp_path):
    job = lm_job(tmp_path, copy.deepcopy(RIGL), ds_json("zero2.json"), save_strategy="steps", save_steps=2)
    out = Path(job["training"]["output_dir"])
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's notes\n")
    return job


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(tmp_path: Path, job: dict, fragment: str, capsys, *argv: str, out: Path | None = None) -> str:
    out = out or tmp_path / "out"
    before = _files(out)
    logging.getLogger().handlers.clear()  # main()'s basicConfig would keep an earlier test's closed capture stream
    for log in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:  # and libraries' handlers
        for h in getattr(log, "handlers", []):
            if type(h) is logging.StreamHandler:
                h.stream = sys.stderr
    rc = main(["--config", str(write_job(tmp_path, job)), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("dimred-train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) < 800
    assert _files(out) == before  # nothing written, nothing changed
    return lines[0]


@pytest.mark.parametrize("edits,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_job_value(tmp_path, base, edits, fragment, capsys):
    for key, value in edits.items():
        _set(base, key, value)
    _refused(tmp_path, base, fragment, capsys, out=tmp_path / "out")


@pytest.mark.parametrize("edits,fragment", [c[1:] for c in DS_CASES], ids=[c[0] for c in DS_CASES])
def test_bad_deepspeed_json(tmp_path, base, edits, fragment, capsys, monkeypatch):
    cfg = json.loads(Path(base["deepspeed"]).read_text())
    cfg.update(edits)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    base["deepspeed"] = str(tmp_path / "ds.json")
    for k, v in DS_ENV.items():
        monkeypatch.setenv(k, v)
    _refused(tmp_path, base, fragment, capsys, "--check")


def test_set_override_and_yaml_alias_bomb(tmp_path, base, capsys):
    _refused(tmp_path, base, "training.learning_rate must be a number", capsys, "--set", "training.learning_rate=fast")
    (tmp_path / "bomb.yaml").write_text(BOMB)
    base["recipe"] = str(tmp_path / "bomb.yaml")
    _refused(tmp_path, base, "expands to more than 100000 values", capsys)


@pytest.mark.parametrize("name,content,fragment", [
    ("t.csv", "body,label\nhello,1\n", "data.text_column: "),
    ("t.jsonl", '{"body": "hello"}\n', "has no column 'text'; its columns: ['body']"),
    ("t.jsonl", "not json\n", "is not JSON lines"),
], ids=["csv without the text column", "json without the text column", "not JSON lines"])
def test_bad_data_file(tmp_path, base, name, content, fragment, capsys):
    (tmp_path / name).write_text(content)
    base["data"] = {"train_files": str(tmp_path / name), "max_length": 32}
    _refused(tmp_path, base, fragment, capsys)


def test_a_fresh_run_never_replaces_an_earlier_summary(tmp_path, base, capsys):
    (tmp_path / "out" / "dimred_summary.json").write_text("{}")
    _refused(tmp_path, base, "dimred_summary.json of an earlier run exists", capsys)


# ---- checkpoints to resume from --------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, base):
    """A complete dimred checkpoint of the job's model at step 2, with Trainer-like files."""
    from transformers import AutoModelForCausalLM

    from dimred_dist.cli.job import ModelConfig

    folder = tmp_path / "out" / "checkpoint-2"
    (folder / "global_step2").mkdir(parents=True)
    torch.save({"module": {}}, folder / "global_step2" / "mp_rank_00_model_states.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    model = AutoModelForCausalLM.from_config(ModelConfig(**tiny_gpt2()).hf_config())
    mgr = dd.DimRedManager(dd.load_recipe(copy.deepcopy(RIGL)), model, total_steps=4).prepare()
    mgr.step = 2
    save_dimred_state(mgr, folder, record_checkpoint=True)
    base["training"]["resume_from_checkpoint"] = str(folder)
    return folder


def _flip(path: Path, at: int = -1) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "dimred" / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


CHECKPOINT_CASES = [
    ("truncated mask file", lambda f: (f / "dimred" / "rank0.safetensors").write_bytes(b"\0" * 10),
     "checksum mismatch"),
    ("flipped mask byte", lambda f: _flip(f / "dimred" / "rank0.safetensors"), "checksum mismatch"),
    ("flipped model byte", lambda f: _flip(f / "global_step2" / "mp_rank_00_model_states.pt"), "checksum mismatch"),
    ("pickle replaces a file", lambda f: (f / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(
        pickle.dumps(print)), "mp_rank_00_model_states.pt: it changed after the save"),
    ("pickle planted", lambda f: (f / "global_step2" / "zero_pp_rank_0_optim_states.pt").write_bytes(
        pickle.dumps(print)), "zero_pp_rank_0_optim_states.pt is not among the files the checkpoint recorded"),
    ("pickle in trainer state", lambda f: (f / "rng_state.pth").write_bytes(pickle.dumps(print)), "rng_state.pth"),
    ("manifest removed", lambda f: (f / "dimred" / "manifest.json").unlink(), "manifest.json is missing"),
    ("manifest not JSON", lambda f: (f / "dimred" / "manifest.json").write_text("{"), "is not valid JSON"),
    ("manifest of another step", lambda f: _edit_manifest(f, step=4), "dimred state of step 4 but its trainer_state"),
    ("manifest of another format", lambda f: _edit_manifest(f, format="other"), "not a dimred checkpoint manifest"),
    ("recorded file removed", lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    ("missing folder", lambda f: f.rename(f.with_name("moved")), "checkpoint directory not found"),
]


@pytest.mark.parametrize("damage,fragment", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoint(tmp_path, base, checkpoint, damage, fragment, capsys):
    damage(checkpoint)
    line = _refused(tmp_path, base, fragment, capsys)
    assert "resume_from_checkpoint" in line


def test_checkpoint_of_another_model(tmp_path, base, checkpoint, capsys):
    base["model"]["config"]["n_embd"] = 48
    _refused(tmp_path, base, "from another model: parameter 'transformer.wte.weight' has shape (257, 32)", capsys)


def test_the_undamaged_checkpoint_passes_validation(tmp_path, base, checkpoint, capsys):
    assert main(["--config", str(write_job(tmp_path, base)), "--check"]) == 0, capsys.readouterr().err[-2000:]
