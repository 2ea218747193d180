"""timm backbones: creation, pretrained weights without pickle, and the saved model bundle.

A bundle is a directory with ``weights.safetensors`` and ``model.json``; everything needed to
rebuild the network and preprocess images is in the JSON, so loading never unpickles.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtmc_pipeline.artifacts import MODEL_FILE, read_json, write_json
from mtmc_pipeline.config import ConfigError
from mtmc_pipeline.errors import PretrainedUnavailableError
from mtmc_pipeline.runtime import Runtime
from mtmc_pipeline.training import small_models  # noqa: F401  (registers them with timm)

WEIGHTS_FILE = "weights.safetensors"
_PREFIXES = ("module.", "model.", "_orig_mod.")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a timm model, with the closest names (None when it is one)."""
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"not a timm model.{hint}"


def check_model_name(name: str) -> None:
    """Fail with the closest timm names when ``name`` is not a timm model."""
    problem = model_name_problem(name)
    if problem:
        raise ConfigError(f"train.model = {name!r}: {problem}")


def _size_kwargs(arch: str, img_size: int | None) -> dict[str, Any]:
    """Models with a fixed input size (ViTs and the like) must be built for ``img_size``."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if img_size and cfg is not None and cfg.fixed_input_size:
        return {"img_size": img_size}
    return {}


def _clean_state_dict(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if key in raw and isinstance(raw[key], dict):
            raw = raw[key]
    out = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file, never unpickling objects."""
    if not path.is_file():
        raise PretrainedUnavailableError(f"train.pretrained_path = {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            return _clean_state_dict(load_file(str(path)))
        return _clean_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # a corrupt or hostile file: say which, never crash deeper
        raise PretrainedUnavailableError(
            f"train.pretrained_path = {str(path)!r}: cannot read weights ({type(e).__name__}: {e})"
        ) from None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load every tensor whose name and shape match (``strict=False``).

    Returns the file's tensors that were skipped (unknown name or other shape) and the
    model's tensors that were missing from the file (they keep their initialisation).
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(model.load_state_dict(usable, strict=False).missing_keys)
    return skipped, missing


def create_model(
    arch: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    drop_rate: float = 0.0,
    log: Callable[[str], None] = print,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model with a fresh head of ``num_classes`` outputs."""
    check_model_name(arch)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate, **_size_kwargs(arch, img_size)}
    if pretrained and not pretrained_path:
        try:
            return timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as e:
            raise PretrainedUnavailableError(
                f"train.pretrained = true: could not fetch pretrained weights for {arch!r} "
                f"from the timm/Hugging Face hub ({type(e).__name__}: {e}). If this machine is "
                "offline, download the weights elsewhere and set train.pretrained_path to the "
                ".safetensors file, or set train.pretrained: false to train from scratch."
            ) from None
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (AssertionError, RuntimeError, TypeError, ValueError) as e:
        settings = ", ".join(f"{k} = {v!r}" for k, v in kwargs.items() if k != "num_classes")
        raise ConfigError(
            f"train.model = {arch!r} ({settings}): timm cannot build it: {e}"
        ) from None
    if pretrained_path:
        state = read_weights(Path(pretrained_path))
        skipped, missing = load_matching(model, state)
        log(
            f"loaded {len(state) - len(skipped)} tensors from {pretrained_path}; "
            f"skipped {len(skipped)} (other name or shape): {', '.join(skipped) or '-'}; "
            f"missing {len(missing)} (kept as initialised): {', '.join(missing) or '-'}"
        )
    return model


HUB_TIMEOUT_SECONDS = 3.0
"""Connect/read timeout of the hub probe under ``pretrained: auto``: an offline machine with a
resolver that never answers waits this long once, not minutes."""
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), now or when huggingface_hub loaded."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def find_pretrained(arch: str, log: Callable[[str], None] = print) -> str | None:
    """A local file with pretrained weights for ``arch``, or None; never raises.

    Looks in the Hugging Face cache, then torch hub's checkpoint folder (timm's legacy URL
    weights), then, unless ``HF_HUB_OFFLINE`` is set, downloads from the hub into its cache
    with a short timeout.
    """
    import huggingface_hub

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not timm.models.is_model_pretrained(arch):
        return None
    repo = cfg.hf_hub_id
    names = ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else ()) + _HF_FILES
    if repo:
        for name in names:
            cached = huggingface_hub.try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return cached
    if cfg.url:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if legacy.is_file():
            return str(legacy)
    if _offline() or not repo:
        return None
    try:  # one request without retries says whether the hub answers at all
        url = huggingface_hub.hf_hub_url(repo, names[0])
        huggingface_hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_SECONDS)
        return huggingface_hub.hf_hub_download(
            repo, names[0], etag_timeout=HUB_TIMEOUT_SECONDS, library_name="timm"
        )
    except Exception as e:  # offline, unreachable, refused, missing file: all mean "not here"
        log(f"pretrained weights for {arch} not reachable ({type(e).__name__}): from scratch")
        return None


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: square size and per-channel normalisation."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @classmethod
    def for_model(cls, model: nn.Module, img_size: int) -> Preprocess:
        cfg = timm.data.resolve_model_data_config(model)
        return cls(img_size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Preprocess:
        """What a bundle's ``model.json`` records of its preprocessing."""
        return cls(info["img_size"], tuple(info["mean"]), tuple(info["std"]), info["interpolation"])


def save_bundle(directory: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` and ``model.json`` (``info`` must hold arch and classes)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    write_json(directory / MODEL_FILE, info)


def load_bundle(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model for inference, plus its ``model.json`` contents.

    The architecture comes from the JSON and the tensors from safetensors: nothing is unpickled.
    The model is in eval mode and channels-last (NHWC) memory format, which convolutions run
    faster in on CPUs (oneDNN) and GPUs alike; feed it with ``Normalize(..., channels_last=True)``.
    """
    info = read_json(directory / MODEL_FILE)
    model = timm.create_model(
        info["arch"],
        pretrained=False,
        num_classes=len(info["class_names"]),
        **_size_kwargs(info["arch"], info.get("img_size")),
    )
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device, memory_format=torch.channels_last).eval(), info


def logits_fp32(model: nn.Module, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Float32 logits of a batch: the backbone under the runtime's autocast, the classifier head
    (pooling and the last layer) in fp32. Logits rounded to bf16 would move the calibration
    thresholds fitted on them, and a CPU run of the same model (fp32) would not match."""
    with runtime.autocast():
        features = model.forward_features(x)
    return model.forward_head(features.float()).float()
