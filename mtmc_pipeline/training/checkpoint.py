"""The training checkpoint: everything needed to continue a killed run, in one safetensors file.

A checkpoint is written atomically after every epoch. Its tensors (model, optimizer moments,
EMA, best weights, random generator states) are safetensors entries; the structure around them
(epoch, history, scheduler counters, numbers, tuples, integer keys) is JSON in the file's
header metadata, with each tensor replaced by a reference. Loading therefore never unpickles,
and a checkpoint made from other inputs (another fingerprint) or a damaged file is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_STATE_KEY = "state"
_FINGERPRINT_KEY = "fingerprint"


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; its tensors move into ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):  # numpy's generator state: raw bytes, dtype and shape
        raw = torch.frombuffer(bytearray(obj.tobytes()), dtype=torch.uint8)
        ref = encode(raw, tensors)
        return {"__ndarray__": ref, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share memory: copy the second and later ones."""
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[name] = t.clone()
        seen.add(ptr)


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        raw = decode(obj["__ndarray__"], tensors).numpy().tobytes()
        return np.frombuffer(raw, dtype=obj["dtype"]).reshape(obj["shape"]).copy()
    (kind, value), *_ = obj.items()
    if kind == "__tensor__":
        return tensors[value]
    if kind == "__dict__":
        return {k: decode(v, tensors) for k, v in value.items()}
    if kind == "__items__":
        return {decode(k, tensors): decode(v, tensors) for k, v in value}
    if kind == "__tuple__":
        return tuple(decode(v, tensors) for v in value)
    raise ValueError(f"unknown checkpoint entry {kind!r}")


class Checkpoint:
    """The checkpoint file of one training run, tied to the run's input fingerprint."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def save(self, state: dict[str, Any]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            _STATE_KEY: json.dumps(encode(state, tensors)),
            _FINGERPRINT_KEY: self.fingerprint,
        }
        _unshare(tensors)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self) -> tuple[dict[str, Any] | None, str]:
        """The saved state (None when there is none to resume from) and why."""
        if not self.path.is_file():
            return None, "no checkpoint"
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get(_FINGERPRINT_KEY) != self.fingerprint:
                    return None, "the checkpoint was made from other inputs or settings"
                names = f.keys()  # a list; safe_open itself is not iterable
                tensors = {name: f.get_tensor(name) for name in names}
            return decode(json.loads(meta[_STATE_KEY]), tensors), "resumed"
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
            return None, f"the checkpoint is unreadable ({type(e).__name__}: {e})"

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
