"""A training job: one YAML file with validated ``model``, ``data``, ``recipe``, ``deepspeed`` and
``training`` sections.

Everything here is checked when the job is loaded, before a model, dataset, process group or
output folder exists: unknown keys and impossible values raise a ``ValueError`` (or
``FileNotFoundError``) that names the section and key. Example::

    model:
      config: {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2, n_positions: 128, vocab_size: 257}
      task: causal-lm
    data:
      train_files: [corpus/train.txt]
      validation_fraction: 0.05
      max_length: 128
    recipe: configs/rigl_90.yaml         # a recipe file or an inline mapping (dimred_dist.load_recipe)
    deepspeed: configs/deepspeed/zero2.json
    training:                            # transformers.TrainingArguments keyword arguments
      output_dir: runs/tiny_gpt2
      max_steps: 100

Relative paths are resolved against the current working directory (as in accelerate's configs).
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from dimred_dist.core.config import Recipe, build_dataclass, load_recipe, load_yaml, read_yaml_mapping
from dimred_dist.core.registry import get_method
from dimred_dist.core.typecheck import brief, describe, matches

TASKS = ("causal-lm", "sequence-classification")
FORMATS = ("text", "csv", "json")
SAMPLE_BY = ("line", "paragraph", "document")
_EXTENSIONS = {".txt": "text", ".text": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}
#: Tokens of the byte-level fallback tokenizer: the 256 byte values plus one end-of-text token.
BYTE_VOCAB_SIZE = 257
_YAML11_BOOLS = ("yes", "no", "y", "n", "on", "off")
#: TrainingArguments keys the CLI owns, with where the setting lives instead.
RESERVED_TRAINING_KEYS = {
    "deepspeed": "name the DeepSpeed JSON in the job's top-level `deepspeed` key",
    "optim": "the optimizer is dimred_dist's CompactAdamW (its hyper-parameters: learning_rate, adam_beta1, "
    "adam_beta2, adam_epsilon, weight_decay)",
    "optim_args": "the optimizer is dimred_dist's CompactAdamW",
}


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train.

    Attributes:
        pretrained: A local folder written by ``save_pretrained`` (weights, config, tokenizer).
        config: Instead of ``pretrained``: ``AutoConfig.for_model(model_type, **rest)`` keyword
            arguments; the model starts from random weights (seeded by ``training.seed``).
        task: ``causal-lm`` or ``sequence-classification`` (selects the ``AutoModelFor...`` class).
        num_labels: Classes of a sequence-classification task; default: inferred from the labels.
        tokenizer: A tokenizer folder; default: the pretrained folder, or a byte-level tokenizer
            (257 tokens: bytes and end-of-text) for a config-built model.
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    task: str = "causal-lm"
    num_labels: int | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("model: give exactly one of `pretrained` (a local folder) or `config` (a mapping)")
        if self.task not in TASKS:
            raise ValueError(f"model.task: unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.num_labels is not None:
            if self.task != "sequence-classification":
                raise ValueError("model.num_labels: only a sequence-classification task has labels")
            if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 2:
                raise ValueError(f"model.num_labels must be an integer >= 2, got {self.num_labels!r}")
        if self.pretrained is not None and not os.path.isdir(self.pretrained):
            raise FileNotFoundError(f"model.pretrained: folder not found: {self.pretrained}")
        if self.tokenizer is not None and not os.path.isdir(self.tokenizer):
            raise FileNotFoundError(f"model.tokenizer: folder not found: {self.tokenizer}")
        if self.config is not None:
            self.hf_config()  # validates model_type and keys now

    def meta_model(self) -> Any:
        """The model with this config on the ``meta`` device: parameter names and shapes, no memory."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForCausalLM if self.task == "causal-lm" else AutoModelForSequenceClassification
        try:
            with torch.device("meta"):
                return auto.from_config(self.hf_config())
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"model: cannot build a {self.task} model from this config: {brief(str(e))}") from None

    def hf_config(self) -> Any:
        """The ``transformers`` config: built from ``config``, or read from the pretrained folder."""
        from transformers import AutoConfig

        if self.config is None:
            try:
                return AutoConfig.from_pretrained(self.pretrained)
            except (OSError, ValueError) as e:
                raise ValueError(f"model.pretrained: cannot read a config from {self.pretrained}: {e}") from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(self.config, dict) or not isinstance(self.config.get("model_type"), str):
            raise TypeError(f"model.config must be a mapping with a `model_type` string, got {self.config!r}")
        kwargs = dict(self.config)
        model_type = kwargs.pop("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"model.config.model_type: unknown model type {model_type!r} (e.g. gpt2, bert, llama)")
        if self.tokenizer is None:  # the byte-level tokenizer's end-of-text token, unless set
            kwargs.setdefault("bos_token_id", BYTE_VOCAB_SIZE - 1)
            kwargs.setdefault("eos_token_id", BYTE_VOCAB_SIZE - 1)
        cls = CONFIG_MAPPING[model_type]
        known = set(inspect.signature(cls.__init__).parameters) | set(cls().to_dict()) | {"num_labels"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"model.config: unknown key(s) {unknown} for model_type {model_type!r}")
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model.config: {e}") from None


@dataclass(kw_only=True)
class DataConfig:
    """Local data files, read with ``datasets.load_dataset(format, data_files=...)``.

    Attributes:
        train_files: Files or glob patterns of the training data.
        validation_files: Files or globs of the validation data (excludes ``validation_fraction``).
        validation_fraction: Fraction of training examples held out, split with ``split_seed``.
        split_seed: Seed of that split (the same split on every rank and run).
        format: ``text``, ``csv`` or ``json``; default: from the extension of the first file.
        sample_by: ``text`` only: one example per ``line``, ``paragraph`` or ``document``.
        text_column: Column with the text (``text`` files always have ``text``).
        label_column: Column with the class label (sequence classification; ints or strings).
        max_length: Tokens per example (causal LM: text is concatenated and cut into blocks).
    """

    train_files: list[str]
    validation_files: list[str] = field(default_factory=list)
    validation_fraction: float = 0.0
    split_seed: int = 0
    format: str | None = None
    sample_by: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128

    def __post_init__(self) -> None:
        self.train_files = _expand("data.train_files", self.train_files, required=True)
        self.validation_files = _expand("data.validation_files", self.validation_files, required=False)
        if self.format is None:
            ext = os.path.splitext(self.train_files[0])[1].lower()
            if ext not in _EXTENSIONS:
                raise ValueError(f"data.format: unknown extension of {self.train_files[0]!r}; set one of {FORMATS}")
            self.format = _EXTENSIONS[ext]
        if self.format not in FORMATS:
            raise ValueError(f"data.format: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        if self.sample_by is not None and (self.format != "text" or self.sample_by not in SAMPLE_BY):
            raise ValueError(f"data.sample_by: one of {SAMPLE_BY}, for text files only; got {self.sample_by!r}")
        if isinstance(self.validation_fraction, bool) or not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.validation_fraction and self.validation_files:
            raise ValueError("data: give validation_files or validation_fraction, not both")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise ValueError(f"data.split_seed must be a non-negative integer, got {self.split_seed!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"data.max_length must be an integer >= 2, got {self.max_length!r}")
        if self.format == "text" and self.text_column != "text":
            raise ValueError("data.text_column: text files have one column, `text`")

    def columns(self) -> set[str] | None:
        """The columns of the first training file (``csv``: its header; ``json``: the keys of its first
        record), or None where they cannot be read cheaply (a JSON array file)."""
        path = self.train_files[0]
        if self.format == "text":
            return {"text"}
        try:
            with open(path, encoding="utf-8", newline="") as f:
                if self.format == "csv":
                    import csv

                    return set(next(csv.reader(f), []))
                first = next((line for line in f if line.strip()), "")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"data.train_files: cannot read {path}: {brief(str(e))}") from None
        if first.lstrip().startswith("["):
            return None
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.train_files: {path} is not JSON lines (line 1: {e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"data.train_files: the records of {path} must be JSON objects, got {brief(record)}")
        return set(record)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_files) or self.validation_fraction > 0


def _expand(key: str, value: Any, *, required: bool) -> list[str]:
    """Files from a path, glob or list of them; each must match something."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise TypeError(f"{key}: expected a path or a list of paths, got {value!r}")
    if required and not items:
        raise ValueError(f"{key}: no file given")
    files: list[str] = []
    for item in items:
        hits = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.isfile(item) else [])
        if not hits:
            raise FileNotFoundError(f"{key}: no file matches {item!r}")
        files.extend(hits)
    return files


@dataclass(kw_only=True)
class JobConfig:
    """A whole job. ``recipe`` and ``deepspeed`` are loaded (and validated) at construction.

    Attributes:
        model: What to train.
        data: On which data.
        recipe: Path of a recipe YAML or an inline recipe mapping (see :class:`dimred_dist.Recipe`);
            passed through :func:`dimred_dist.load_recipe`, so any registered method works.
        deepspeed: Path of a DeepSpeed JSON (no ``optimizer`` section), or null. Used under the
            ``deepspeed`` launcher, torchrun and SLURM; under ``accelerate launch`` the accelerate
            config names the JSON (the two must agree); a plain ``python`` run ignores it.
        training: ``transformers.TrainingArguments`` keyword arguments; ``output_dir`` is required.
            ``resume_from_checkpoint`` (a path, or true for the newest complete checkpoint of
            ``output_dir``) resumes a run; a path is verified here (every file's checksum, its step,
            its model), before anything is built.
        max_nonfinite_steps: Optimizer steps in a row with non-finite gradients after which the run stops
            as diverged (exit code 3, recorded in the summary); 0: never.
        overwrite_output_dir: Allow a fresh run to replace the ``dimred_summary.json`` an earlier run left
            in ``output_dir`` (refused otherwise; a resumed run replaces it).
    """

    model: ModelConfig
    data: DataConfig
    recipe: Recipe
    deepspeed: str | None = None
    training: dict[str, Any]
    overwrite_output_dir: bool = False
    max_nonfinite_steps: int = 10
    deepspeed_config: dict[str, Any] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.model = build_dataclass(ModelConfig, self.model, "model")
        self.data = build_dataclass(DataConfig, self.data, "data")
        self.recipe = _load_recipe(self.recipe)
        if self.deepspeed is not None:
            self.deepspeed_config = read_deepspeed_json(self.deepspeed, "deepspeed")
        check_training_keys(self.training)
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        cfg = self.model.hf_config()
        if self.model.config is not None and self.model.tokenizer is None:
            vocab = getattr(cfg, "vocab_size", None)
            if vocab is not None and vocab < BYTE_VOCAB_SIZE:
                raise ValueError(
                    f"model.config.vocab_size: a config-built model without model.tokenizer uses the byte-level "
                    f"tokenizer ({BYTE_VOCAB_SIZE} tokens), got vocab_size={vocab}"
                )
        positions = next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings") if hasattr(cfg, k)), None)
        if positions is not None and self.data.max_length > positions:
            raise ValueError(f"data.max_length={self.data.max_length} exceeds the model's {positions} positions")
        method_cls = get_method(self.recipe.method)
        if getattr(method_cls, "needs_pretrained", False) and self.model.pretrained is None:
            raise ValueError(
                f"recipe: {self.recipe.method!r} fine-tunes a pretrained model (its frozen entries keep their "
                "pretrained values), but the job's model is built from model.config at random; give model.pretrained"
            )
        if self.training.get("eval_strategy", "no") != "no" and not self.data.has_validation:
            raise ValueError("training.eval_strategy needs data.validation_files or data.validation_fraction")
        columns = self.data.columns()
        wanted = [("text_column", self.data.text_column)]
        if self.model.task == "sequence-classification":
            wanted.append(("label_column", self.data.label_column))
        for key, col in wanted:
            if columns is not None and col not in columns:
                raise ValueError(f"data.{key}: {self.data.train_files[0]} has no column {brief(col)}; its columns: "
                                 f"{brief(sorted(columns))}")
        from dimred_dist.core.preflight import check_recipe_on_model

        model = self.model.meta_model()
        check_recipe_on_model(self.recipe, model)
        resume = self.training.get("resume_from_checkpoint")
        if isinstance(resume, str):
            check_resume_checkpoint(resume, model)
        summary = os.path.join(self.training["output_dir"], "dimred_summary.json")
        if os.path.exists(summary) and not resume and not self.overwrite_output_dir:
            raise ValueError(f"training.output_dir: {summary} of an earlier run exists; use another output_dir, "
                             "resume that run (training.resume_from_checkpoint), or set overwrite_output_dir: true")


def check_resume_checkpoint(path: str, model: Any) -> None:
    """A checkpoint to resume from: complete (every file's recorded checksum), at the Trainer's step, of ``model``."""
    from dimred_dist.distributed.checkpoint import CheckpointError, check_model
    from dimred_dist.distributed.integrity import resumable

    try:
        manifest = resumable(path)
        check_model(manifest, {n: tuple(p.shape) for n, p in model.named_parameters()}, managed=False)
    except (FileNotFoundError, CheckpointError) as e:
        raise ValueError(f"training.resume_from_checkpoint: {e}") from None


def _load_recipe(value: Any) -> Recipe:
    if isinstance(value, Recipe):
        return value
    if not isinstance(value, (str, dict)):
        raise TypeError(f"recipe: expected a path or a mapping, got {value!r}")
    try:
        return load_recipe(value)
    except (ValueError, TypeError) as e:
        raise type(e)(str(e) if str(e).startswith("recipe") else f"recipe: {e}") from None


def read_deepspeed_json(path: str, key: str) -> dict[str, Any]:
    """A DeepSpeed JSON file as a mapping; ``key`` names where the path came from in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: DeepSpeed config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{key}: {path} must hold a JSON object")
    return data


def training_defaults() -> dict[str, Any]:
    """``TrainingArguments`` field defaults, by name."""
    from transformers import TrainingArguments

    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.init:
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def training_types() -> dict[str, Any]:
    """``TrainingArguments`` field annotations, by name (empty where they cannot be resolved)."""
    from transformers import TrainingArguments

    try:
        return typing.get_type_hints(TrainingArguments)
    except (NameError, TypeError):
        return {}


def check_training_keys(training: Any) -> None:
    """Reject keys ``TrainingArguments`` does not know, keys the CLI owns, and a missing ``output_dir``."""
    if not isinstance(training, dict):
        raise TypeError(f"training: expected a mapping of TrainingArguments keyword arguments, got {training!r}")
    known = training_defaults()
    unknown = sorted(set(training) - set(known))
    if unknown:
        raise ValueError(f"training: unknown key(s) {unknown}: not transformers.TrainingArguments arguments")
    for key, why in RESERVED_TRAINING_KEYS.items():
        if key in training:
            raise ValueError(f"training.{key}: set by dimred-train; {why}")
    hints = training_types()
    for key, value in list(training.items()):
        if isinstance(value, bool) and isinstance(known[key], str):
            raise TypeError(
                f"training.{key}: got the boolean {value}, expected a string; YAML reads unquoted no/yes/off/on as "
                f'booleans: write "{"no" if not value else "yes"}"'
            )
        hint = hints.get(key, Any)
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            continue  # the Trainer takes true: the newest complete checkpoint
        if matches(value, hint):
            continue
        if isinstance(value, str) and matches(1.0, hint) and _FLOAT.match(value.strip()):
            training[key] = float(value)  # YAML 1.1 reads 1e-3 as a string; TrainingArguments would keep it one
            if matches(training[key], hint):
                continue
        raise TypeError(f"training.{key} must be {describe(hint)} (transformers.TrainingArguments), got {brief(value)}")
    out = training.get("output_dir")
    if not isinstance(out, str) or not out:
        raise ValueError("training.output_dir is required (a folder path)")


def load_job(path: str, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job file.

    Args:
        path: The job YAML.
        overrides: ``section.key=value`` strings (value parsed as YAML), applied before validation.
    """
    data = read_yaml_mapping(path, "job")
    for item in overrides or []:
        apply_override(data, item)
    missing = [k for k in ("model", "data", "recipe", "training") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing section(s) {missing}")
    return build_dataclass(JobConfig, data, "job")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in ``data``; a recipe given as a path is read first so its keys can be set."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects section.key=value, got {item!r}")
    parts = key.split(".")
    if parts[0] == "recipe" and len(parts) > 1 and isinstance(data.get("recipe"), str):
        data["recipe"] = read_yaml_mapping(data["recipe"], "recipe")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise TypeError(f"--set {item!r}: {p!r} is not a mapping")
        node = node[p]
    # Only true/false are booleans on the command line (YAML 1.1 would turn `no` into False).
    node[parts[-1]] = raw if raw.strip().lower() in _YAML11_BOOLS else load_yaml(raw)
