"""Job validation: every mistake raises before anything is built, naming the key, and leaves the
output folder untouched. In-process (``load_job`` / ``plan_run`` / ``main``) except one real CLI run."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

import dimred_dist
from dimred_dist.cli.job import load_job
from dimred_dist.cli.plan import plan_run
from dimred_dist.cli.train import main
from dimred_dist.core.registry import get_method
from tests.cli.jobs import (
    BIN,
    REPO,
    ds_json,
    env,
    lm_job,
    recipe_file,
    tiny_gpt2,
    write_job,
    write_labeled,
    write_pretrained_bert,
)

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
DS_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": "2"}  # as the deepspeed launcher sets


@pytest.fixture
def job(tmp_path) -> dict:
    return lm_job(tmp_path, recipe_file("rigl_90.yaml"), ds_json("zero2.json"))


def _fails(tmp_path: Path, job: dict, *fragments: str, capsys) -> None:
    """``dimred-train`` exits with 2, the message names every fragment, and output_dir does not exist."""
    path = write_job(tmp_path, job)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not Path(job["training"]["output_dir"]).exists()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_file_loads(path):
    recipe = dimred_dist.load_recipe(path)
    assert recipe.method in dimred_dist.registered_methods()


def test_example_jobs_validate(tmp_path):
    fortunes = Path("/usr/share/games/fortunes")
    if fortunes.is_dir():
        job = load_job(str(REPO / "configs/jobs/tiny_gpt2_fortunes.yaml"))
        assert plan_run(job, env={}).launcher == "python"
        assert plan_run(job, env=DS_ENV).pass_to_training_args
    data = str(write_labeled(tmp_path / "t.jsonl"))
    folder = write_pretrained_bert(tmp_path / "bert")
    overrides = [f"model.pretrained={folder}", f"data.train_files={data}", f"data.validation_files={data}",
                 "data.max_length=32"]
    job = load_job(str(REPO / "configs/jobs/minilm_fortunes_topics.yaml"), overrides)
    assert job.model.task == "sequence-classification" and job.recipe.method == "rigl"


@pytest.mark.parametrize("recipe", [p.name for p in RECIPES])
@pytest.mark.parametrize("stage", [2, 3])
def test_every_recipe_runs_with_zero2_and_zero3_json(tmp_path, job, recipe, stage):
    job["recipe"], job["deepspeed"] = recipe_file(recipe), ds_json(f"zero{stage}.json")
    if get_method(dimred_dist.load_recipe(recipe_file(recipe)).method).needs_pretrained:
        job["model"] = {"pretrained": str(_pretrained_gpt2(tmp_path / "gpt2")), "task": "causal-lm"}
    if "encoder" in recipe or recipe in ("dense_baseline.yaml", "train_norms_biases.yaml"):
        # Recipes written for encoder classifiers: their patterns name BERT's layers and its head.
        data = str(write_labeled(tmp_path / "t.jsonl"))
        job["model"] = {"pretrained": str(write_pretrained_bert(tmp_path / "bert")), "task": "sequence-classification"}
        job["data"] = {"train_files": data, "validation_files": data, "max_length": 32}
    plan = plan_run(load_job(str(write_job(tmp_path, job))), env=DS_ENV)
    assert plan.pass_to_training_args and plan.deepspeed_config["zero_optimization"]["stage"] == stage


def test_unknown_method(tmp_path, job, capsys):
    job["recipe"] = {"method": "snipp", "sparsity": 0.9}
    _fails(tmp_path, job, "unknown method 'snipp'", "register_method", capsys=capsys)


@pytest.mark.parametrize(
    "where,key",
    [((), "modle"), (("model",), "pretrain"), (("model", "config"), "n_layers"), (("data",), "max_len"),
     (("recipe",), "sparsty"), (("recipe", "args"), "update_every"), (("training",), "max_step")],
)
def test_unknown_key_in_each_section(tmp_path, job, where, key, capsys):
    if where and where[0] == "recipe":
        job["recipe"] = {"method": "rigl", "sparsity": 0.9, "args": {}}
    node = job
    for part in where:
        node = node[part]
    node[key] = 1
    _fails(tmp_path, job, key, capsys=capsys)


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, '"optimizer" section'),
        ({"train_micro_batch_size_per_gpu": 4}, "per_device_train_batch_size"),
        ({"train_batch_size": 3}, "train_batch_size=3"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"gradient_clipping": 0.5}, "max_grad_norm"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True"),
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage=0"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin_gradients"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.5}}}, "learning_rate"),
    ],
)
def test_conflicting_deepspeed_json(tmp_path, job, change, fragment, capsys):
    cfg = json.loads(Path(ds_json("zero2.json")).read_text())
    cfg.update(change)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    job["deepspeed"] = str(tmp_path / "ds.json")
    # Checked on every launch, plain python included (the same job file runs under all of them).
    _fails(tmp_path, job, fragment, capsys=capsys)
    with pytest.raises(ValueError, match="conflicts with the job"):
        plan_run(load_job(str(tmp_path / "job.yaml")), env=DS_ENV)


def _pretrained_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(**{k: v for k, v in tiny_gpt2()["config"].items() if k != "model_type"})
                    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", ["spiel_95_encoder.yaml", "fish_95_encoder.yaml"])
def test_sparse_finetune_needs_a_pretrained_model(tmp_path, job, recipe, capsys):
    job["recipe"] = recipe_file(recipe)
    method = dimred_dist.load_recipe(recipe_file(recipe)).method
    _fails(tmp_path, job, f"recipe: {method!r} fine-tunes a pretrained model", "give model.pretrained", capsys=capsys)


def test_pretrained_folder_missing(tmp_path, job, capsys):
    job["model"] = {"pretrained": str(tmp_path / "no_such_model"), "task": "causal-lm"}
    _fails(tmp_path, job, "model.pretrained: folder not found", capsys=capsys)


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda j: j["training"].update(save_strategy=False), 'write "no"'),  # YAML's unquoted no
        (lambda j: j["training"].update(deepspeed="x.json"), "training.deepspeed"),
        (lambda j: j["training"].update(optim="adafactor"), "training.optim"),
        (lambda j: j["training"].pop("output_dir") and j["training"].update(max_steps=4), "output_dir is required"),
        (lambda j: j["training"].update(eval_strategy="steps") or j["data"].pop("validation_fraction"),
         "eval_strategy"),
        (lambda j: j["model"]["config"].update(vocab_size=100), "vocab_size"),
        (lambda j: j["data"].update(max_length=65), "max_length=65"),
        (lambda j: j["data"].update(train_files="/no/such/file.txt"), "data.train_files"),
        (lambda j: j["model"].update(task="translation"), "model.task"),
        (lambda j: j["model"]["config"].update(model_type="gpt9"), "gpt9"),
        (lambda j: j.update(deepspeed="/no/such/ds.json"), "DeepSpeed config not found"),
        (lambda j: j.pop("recipe"), "missing section"),
    ],
)
def test_other_mistakes(tmp_path, job, mutate, fragment, capsys):
    job = copy.deepcopy(job)
    mutate(job)
    if "output_dir" not in job["training"]:
        job["training"]["output_dir"] = ""
    out = job["training"]["output_dir"] or str(tmp_path / "out")
    path = write_job(tmp_path, job)
    assert main(["--config", str(path)]) == 2
    assert fragment in capsys.readouterr().err
    assert not Path(out).exists()


def test_accelerate_uses_its_own_deepspeed_config(tmp_path, job):
    acc = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_json("zero2.json")}
    loaded = load_job(str(write_job(tmp_path, job)))
    plan = plan_run(loaded, env=acc)
    assert plan.launcher == "accelerate" and not plan.pass_to_training_args
    assert plan.deepspeed_config["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="different DeepSpeed config"):
        plan_run(loaded, env={**acc, "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_json("zero3.json")})
    with pytest.raises(ValueError, match="not launched with a DeepSpeed config"):
        plan_run(loaded, env={"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"})
    job["deepspeed"] = None
    plan = plan_run(load_job(str(write_job(tmp_path, job))), env={**acc, "ACCELERATE_DEEPSPEED_CONFIG_FILE": ds_json(
        "zero3.json")})
    assert plan.deepspeed_config["zero_optimization"]["stage"] == 3 and plan.deepspeed_source.endswith("zero3.json")


def test_plain_python_does_not_use_deepspeed(tmp_path, job):
    plan = plan_run(load_job(str(write_job(tmp_path, job))), env={})
    assert plan.launcher == "python" and plan.deepspeed_config is None and not plan.pass_to_training_args


def test_overrides(tmp_path, job):
    path = str(write_job(tmp_path, job))
    loaded = load_job(path, ["recipe.sparsity=0.8", "training.save_strategy=no", "deepspeed=null",
                             "recipe.schedule.interval=7"])
    assert loaded.recipe.sparsity == 0.8 and loaded.recipe.schedule.interval == 7
    assert loaded.training["save_strategy"] == "no" and loaded.deepspeed is None
    with pytest.raises(ValueError, match="section.key=value"):
        load_job(path, ["training.max_steps"])


def test_real_cli_rejects_before_writing(tmp_path, job):
    """The installed console script, as a user runs it: exit code 2, a one-line reason, nothing written."""
    job["recipe"] = {"method": "rigl", "sparsity": 1.5}
    path = write_job(tmp_path, job)
    proc = subprocess.run([str(BIN / "dimred-train"), "--config", str(path)], cwd=REPO, env=env(tmp_path),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sparsity must be in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_exponent_numbers_read_as_numbers(tmp_path, job):
    """``1e-4`` is a number on the command line and in YAML files (PyYAML's YAML 1.1 reads a string)."""
    path = write_job(tmp_path, job)
    loaded = load_job(str(path), ["training.learning_rate=1e-4", "training.weight_decay=2E-2"])
    assert loaded.training["learning_rate"] == 1e-4 and loaded.training["weight_decay"] == 0.02
    from dimred_dist.core.config import load_yaml

    assert load_yaml("lr: 3e-5\nname: 1e4x\nn: 7") == {"lr": 3e-5, "name": "1e4x", "n": 7}
