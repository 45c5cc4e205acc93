"""Datasets of a job: local files through ``datasets.load_dataset``, tokenized for the job's task.

* causal LM: every example's tokens plus an end-of-text token, concatenated and cut into blocks
  of ``max_length`` (the incomplete last block of each map batch is dropped, as in
  transformers' ``run_clm``); ``labels`` are the inputs (the model shifts them).
* sequence classification: each text truncated / padded to ``max_length`` with an attention
  mask; string labels become ids in sorted order.

The validation split is either its own files or a fraction of the training examples chosen with
a fixed seed, so every rank and every run sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dimred_dist.cli.job import BYTE_VOCAB_SIZE, DataConfig

_MAP_BATCH = 1000


class ByteTokenizer:
    """Bytes of the UTF-8 text as tokens 0..255, end-of-text (also padding) 256: no download needed."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_token_id = 256
    pad_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@dataclass
class Datasets:
    """Tokenized splits and what the model needs to know about them.

    Attributes:
        train: Training examples (``input_ids``, ``labels`` and for classification ``attention_mask``).
        validation: Validation examples, or None.
        label_names: Class names in id order (sequence classification), else None.
        pad_token_id: Padding id the model must know (sequence classification), else None.
    """

    train: Any
    validation: Any | None
    label_names: list[str] | None
    pad_token_id: int | None


def load_raw(cfg: DataConfig) -> Any:
    """A ``DatasetDict`` with ``train`` and, if configured, ``validation``."""
    from datasets import load_dataset

    files = {"train": cfg.train_files}
    if cfg.validation_files:
        files["validation"] = cfg.validation_files
    kwargs = {"sample_by": cfg.sample_by} if cfg.sample_by else {}
    raw = load_dataset(cfg.format, data_files=files, **kwargs)
    if cfg.validation_fraction > 0:
        split = raw["train"].train_test_split(test_size=cfg.validation_fraction, seed=cfg.split_seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    for name, ds in raw.items():
        if cfg.text_column not in ds.column_names:
            raise ValueError(f"data.text_column: no column {cfg.text_column!r} in the {name} data: {ds.column_names}")
    return raw


def _encoder(tokenizer: Any):
    if isinstance(tokenizer, ByteTokenizer):
        return lambda texts: [tokenizer.encode(t) for t in texts]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def causal_lm(raw: Any, tokenizer: Any, cfg: DataConfig) -> Datasets:
    """Concatenate and block the text of every split."""
    encode = _encoder(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    block = cfg.max_length

    def to_blocks(batch: dict[str, list]) -> dict[str, list]:
        tokens: list[int] = []
        for ids in encode([t or "" for t in batch[cfg.text_column]]):
            tokens.extend(ids)
            if eos is not None:
                tokens.append(eos)
        n = len(tokens) // block
        blocks = [tokens[i * block : (i + 1) * block] for i in range(n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    out = {}
    for name, ds in raw.items():
        out[name] = ds.map(to_blocks, batched=True, batch_size=_MAP_BATCH, remove_columns=ds.column_names)
        if len(out[name]) == 0:
            raise ValueError(f"data: the {name} text yields no block of data.max_length={block} tokens")
    return Datasets(out["train"], out.get("validation"), None, None)


def sequence_classification(raw: Any, tokenizer: Any, cfg: DataConfig, num_labels: int | None) -> Datasets:
    """Pad / truncate every text to ``max_length`` and map labels to ids."""
    for name, ds in raw.items():
        if cfg.label_column not in ds.column_names:
            raise ValueError(f"data.label_column: no column {cfg.label_column!r} in the {name} data: {ds.column_names}")
    values = sorted({v for ds in raw.values() for v in ds.unique(cfg.label_column)}, key=str)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        names = [str(i) for i in range(max(values) + 1)] if values else []
        to_id = {v: v for v in values}
    elif all(isinstance(v, str) for v in values):
        names, to_id = values, {v: i for i, v in enumerate(values)}
    else:
        raise ValueError(f"data.label_column: labels must be all integers or all strings, got {values[:10]}")
    if num_labels is not None and len(names) > num_labels:
        raise ValueError(f"model.num_labels={num_labels} but the data has {len(names)} classes: {names[:20]}")
    if num_labels is not None:
        names += [str(i) for i in range(len(names), num_labels)]
    pad = tokenizer.pad_token_id

    def prepare(batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[cfg.text_column]]
        labels = [to_id[v] for v in batch[cfg.label_column]]
        if not isinstance(tokenizer, ByteTokenizer):  # its own special tokens ([CLS] ... [SEP]) and padding
            enc = tokenizer(texts, truncation=True, max_length=cfg.max_length, padding="max_length")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        ids = [tokenizer.encode(t)[: cfg.max_length] for t in texts]
        return {
            "input_ids": [x + [pad] * (cfg.max_length - len(x)) for x in ids],
            "attention_mask": [[1] * len(x) + [0] * (cfg.max_length - len(x)) for x in ids],
            "labels": labels,
        }

    out = {name: ds.map(prepare, batched=True, batch_size=_MAP_BATCH, remove_columns=ds.column_names)
           for name, ds in raw.items()}
    return Datasets(out["train"], out.get("validation"), names, pad)
