"""Scoring passes outside a training step: forward / backward on probe data, no optimizer step.

Pruning-at-initialization methods (SNIP, GraSP, SynFlow, iterative SNIP, FORCE) score entries by
gradients of a loss on a few batches, sometimes under a temporary weight transform (|w| for SynFlow,
w + eps * g for GraSP's finite differences, w * mask for progressive pruning). A :class:`Prober`
runs them on any shard adapter:

* one process / DDP: on the bare module; every replica computes the same batches, so no gradient
  is exchanged and the scores do not depend on the world size;
* DeepSpeed ZeRO 1/2/3: through the engine, as the last micro-batch of a step, so each rank reads
  the reduced gradient of its own partition; the gradients are then discarded without a step.

The batches are the same on every rank (:class:`ProbeData`; the Trainer integration draws them from
the train set with the recipe's seed). The module runs in eval mode (dropout off, normalization with
running statistics, as Synaptic-Flow's pruning loop does), and whatever a pass edits (masters,
buffers, frozen tensors) is restored bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimred_dist.core.logging import get_logger

logger = get_logger(__name__)

__all__ = ["ProbeData", "Prober", "default_loss", "split_batch"]


def default_loss(model: Any, batch: Any, *, temperature: float = 1.0) -> torch.Tensor:
    """The loss of a batch: a mapping with ``labels`` goes to the model as keyword arguments (Hugging Face
    style; the model's own loss at temperature 1, else cross-entropy of ``logits / temperature``, shifted
    by one token for a causal LM's 3-D logits), a pair ``(x, y)`` is cross-entropy of ``model(x) / T``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError("a probe batch mapping needs `labels`; give ProbeData a loss_fn for other batches")
        if temperature == 1.0:
            return model(**batch).loss
        labels = batch["labels"]
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = (out.logits if hasattr(out, "logits") else out[0]).float() / temperature
        if logits.dim() == 3:  # causal LM: predict token t + 1 from t, as the model's own loss does
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return F.cross_entropy(_logits(model(x)).float() / temperature, y)
    raise TypeError(f"cannot compute a loss from a probe batch of type {type(batch).__name__}; give a loss_fn")


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


@dataclass
class ProbeData:
    """What scoring passes run on.

    Attributes:
        batches: Batches, the same on every rank (a list: multi-pass methods iterate it several times).
        loss_fn: ``loss_fn(model, batch, temperature=1.0) -> scalar loss``; ``model`` is what to call
            (the module, or the DeepSpeed engine). Default: :func:`default_loss`.
        input_shape: Shape of one synthetic input without the batch dimension, for data-free methods
            (SynFlow); default: from the first batch (token models: an ``inputs_embeds`` of ones).
    """

    batches: Sequence[Any]
    loss_fn: Callable[..., torch.Tensor] = default_loss
    input_shape: Sequence[int] | None = None


class Prober:
    """Runs a method's scoring passes on a shard adapter (see the module docstring).

    Args:
        adapter: The manager's shard adapter.
        model: The module (not a wrapper).
        data: The probe data, or None (data-free methods with a known input shape only).
        views: Views of every trainable parameter (managed or not), by name.
        coll: Collectives over the ranks that share the entries (for global norms).
        check: Collectives over all ranks (to fail on every rank at once).
    """

    def __init__(self, adapter: Any, model: nn.Module, data: ProbeData | None, views: dict, coll: Any,
                 check: Any) -> None:
        self.adapter, self.model, self.data = adapter, model, data
        self.views, self.coll, self.check = views, coll, check
        self.passes = 0
        self.seconds = 0.0

    # ---- data ----------------------------------------------------------------------------
    def batches(self, n: int, who: str) -> list[Any]:
        """The first ``n`` probe batches, on the model's device.

        Raises:
            ValueError: Without data or with fewer than ``n`` batches, naming the method.
        """
        if self.data is None:
            raise ValueError(f"{who} scores entries on data, but no probe data was given: pass "
                             "probe=ProbeData(batches, loss_fn) (the Trainer callback and dimred-train draw it)")
        if len(self.data.batches) < n:
            raise ValueError(f"{who} needs {n} probe batches, got {len(self.data.batches)}")
        device = self.device
        return [_to_device(b, device) for b in list(self.data.batches)[:n]]

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters())
        return p.device

    @property
    def supports_double_backward(self) -> bool:
        return bool(getattr(self.adapter, "supports_double_backward", False))

    # ---- gradients -----------------------------------------------------------------------
    def gradients(self, names: Sequence[str], batches: Sequence[Any], *, temperature: float = 1.0,
                  forward: Callable[[Any, Any], torch.Tensor] | None = None, mean: bool = False,
                  progress: str | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The reduced gradient of this rank's range of ``names``, summed (or averaged) over ``batches``.

        ``forward(model, batch)`` returns the scalar to differentiate (default: the probe loss at
        ``temperature``). The gradients are accumulated in ``dtype`` and unscaled (a loss scale is
        divided out).
        """
        model = self.adapter.probe_model(self.model)
        fwd = forward or (lambda m, b: self.loss(m, b, temperature))
        acc = {n: torch.zeros(self.views[n].local_numel, dtype=dtype, device=self.views[n].weight().device)
               for n in names}
        t0 = time.perf_counter()
        with _eval_mode(self.model):
            for b in _progress(batches, progress):
                self.adapter.backward(fwd(model, b))
                with self.adapter.gradient_scope() as scale:
                    for n in names:
                        g = self.views[n].grad()
                        if g is not None:
                            acc[n] += g.to(dtype) / scale
                self.adapter.discard_gradients(self.model)
                self.passes += 1
        self.seconds += time.perf_counter() - t0
        if mean and batches:
            for t in acc.values():
                t /= len(batches)
        return acc

    def loss(self, model: Any, batch: Any, temperature: float) -> torch.Tensor:
        fn = self.data.loss_fn if self.data is not None else default_loss
        if temperature == 1.0:
            return fn(model, batch)
        try:
            return fn(model, batch, temperature=temperature)
        except TypeError as e:
            if "temperature" not in str(e):
                raise
            raise TypeError(f"the probe loss_fn takes no `temperature` (needed: {temperature}); accept it or set "
                            "the method's temperature to 1") from None

    def check_nonzero(self, grads: dict[str, torch.Tensor], who: str) -> None:
        """Raise on every rank if the probe gave no gradient at all (zero loss, everything frozen)."""
        total = sum(float(g.abs().sum()) for g in grads.values())
        total = float(self.check.all_reduce_sum(torch.tensor([total], dtype=torch.float64))[0])
        if not total > 0.0 or not math.isfinite(total):
            raise ValueError(f"{who}: the probe batches give {'no' if total == 0 else 'a non-finite'} gradient for "
                             "the managed parameters (zero loss, nothing trainable, or an overflow); the scores "
                             "would be meaningless")

    def hessian_gradient(self, names: Sequence[str], batches: Sequence[Any], v: dict[str, torch.Tensor], *,
                         temperature: float, mode: str) -> dict[str, torch.Tensor]:
        """``H v`` on this rank's range of ``names`` for the Hessian of the probe loss summed over ``batches``.

        ``mode``: ``double_backward`` (exact; one process / DDP only), ``finite_difference`` (central
        differences of two gradient evaluations, ``(g(w + eps v) - g(w - eps v)) / (2 eps)`` with
        ``eps = sqrt(machine eps of the weights) * (1 + |w|) / |v|``), or ``auto`` (the first where possible).
        """
        if mode == "auto":
            mode = "double_backward" if self.supports_double_backward else "finite_difference"
        if mode == "double_backward":
            if not self.supports_double_backward:
                raise ValueError("double backward is not possible under DeepSpeed ZeRO; use hvp: finite_difference")
            return self._hvp_double_backward(names, batches, v, temperature)
        return self._hvp_finite_difference(names, batches, v, temperature)

    def _hvp_double_backward(self, names, batches, v, temperature):
        params = [self.views[n].param for n in names]
        with _eval_mode(self.model):
            for b in batches:
                grads = torch.autograd.grad(self.loss(self.model, b, temperature), params, create_graph=True)
                z = sum((g.reshape(-1) * v[n].to(g.dtype)).sum() for n, g in zip(names, grads))
                z.backward()
                self.passes += 1
        out = {n: p.grad.detach().reshape(-1).float().clone() for n, p in zip(names, params)}
        self.adapter.discard_gradients(self.model)
        return out

    @torch.no_grad()
    def _hvp_finite_difference(self, names, batches, v, temperature):
        sq = torch.tensor([sum(float(self.views[n].weight().double().pow(2).sum()) for n in names),
                           sum(float(v[n].double().pow(2).sum()) for n in names)], dtype=torch.float64)
        w_norm, v_norm = self.coll.all_reduce_sum(sq).sqrt().tolist()
        if v_norm == 0.0:
            return {n: torch.zeros_like(v[n]) for n in names}
        dtype = next(self.model.parameters()).dtype
        eps = math.sqrt(torch.finfo(dtype).eps) * (1.0 + w_norm) / v_norm
        with self.preserved():
            self.edit(lambda n, w: w + eps * v[n] if n in v else w)
            with torch.enable_grad():
                plus = self.gradients(names, batches, temperature=temperature)
            self.edit(lambda n, w: w - eps * v[n] if n in v else w)
            with torch.enable_grad():
                minus = self.gradients(names, batches, temperature=temperature)
        return {n: (plus[n] - minus[n]) / (2.0 * eps) for n in names}

    # ---- weights -------------------------------------------------------------------------
    @contextlib.contextmanager
    def preserved(self, *, others: bool = False) -> Iterator[list[torch.Tensor]]:
        """Inside, the masters of every trainable view (and, with ``others``, the buffers and frozen tensors,
        which are yielded) may be edited; on exit every one is restored bit for bit and propagated."""
        saved = {n: v.weight().detach().clone() for n, v in self.views.items()}
        extra = self.adapter.other_tensors(self.model) if others else []
        saved_extra = [t.detach().clone() for t in extra]
        self._saved = saved
        try:
            yield extra
        finally:
            with torch.no_grad():
                for n, v in self.views.items():
                    v.weight().copy_(saved[n])
                for t, s in zip(extra, saved_extra):
                    t.copy_(s)
            self.adapter.weights_edited()
            self._saved = None

    @torch.no_grad()
    def original(self, name: str) -> torch.Tensor:
        """Inside :meth:`preserved`: the master of ``name`` as it was when it began."""
        return self._saved[name]

    @torch.no_grad()
    def edit(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        """Set every trainable master to ``fn(name, original master)`` and propagate it to the module."""
        for n, v in self.views.items():
            v.weight().copy_(fn(n, self._saved[n]))
        self.adapter.weights_edited()

    def rounds(self, n: int, desc: str):
        """``range(n)`` with a progress bar on rank 0 (scoring loops of many passes)."""
        return _progress(range(n), desc)

    # ---- synthetic input (data-free methods) ----------------------------------------------
    def synthetic_input(self, who: str) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of an all-ones input with a batch of one, in the weights' dtype: the probe's
        ``input_shape``, else the first batch's input without its batch dimension; for a token model
        (a batch with ``input_ids``) an all-ones ``inputs_embeds`` of the embedding width."""
        dtype = next(self.model.parameters()).dtype
        shape = None if self.data is None else self.data.input_shape
        first = self.data.batches[0] if self.data is not None and len(self.data.batches) else None
        if isinstance(first, dict) and "input_ids" in first and shape is None:
            width = self.model.get_input_embeddings().embedding_dim
            seq = first["input_ids"].shape[-1]
            return (), {"inputs_embeds": torch.ones(1, seq, width, dtype=dtype, device=self.device)}
        if shape is None and first is not None:
            x = first[0] if isinstance(first, (tuple, list)) else first
            if torch.is_tensor(x):
                shape = tuple(x.shape[1:])
        if shape is None:
            raise ValueError(f"{who} needs the shape of one input: give ProbeData(input_shape=...) or one batch")
        return (torch.ones(1, *shape, dtype=dtype, device=self.device),), {}


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def split_batch(batch: Any) -> list[Any]:
    """The samples of a batch, each a batch of one (tensors, or dicts / tuples / lists of tensors with
    one leading batch dimension); per-sample scores (FISH) run on them."""
    if torch.is_tensor(batch):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, Mapping):  # dicts and HF BatchEncoding
        sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
        if len(sizes) != 1:
            raise ValueError(f"cannot split a batch whose tensors have leading sizes {sorted(sizes)}")
        n = sizes.pop()
        return [{k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
                for i in range(n)]
    if isinstance(batch, (tuple, list)):
        parts = [split_batch(v) for v in batch]
        if len({len(p) for p in parts}) != 1:
            raise ValueError("cannot split a batch whose parts have different batch sizes")
        return [type(batch)(p[i] for p in parts) for i in range(len(parts[0]))]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into samples")


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _progress(items: Sequence[Any], desc: str | None):
    """A progress bar on rank 0 for long scoring loops (tqdm, if installed)."""
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if desc is None or not rank0 or len(items) < 5:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)
