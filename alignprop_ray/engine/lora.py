"""LoRA adapters on the UNet: attach (peft), save/load in the diffusers format, and interpolate.

On disk an adapter is a directory holding `pytorch_lora_weights.safetensors` with keys
`unet.<module>.lora_A.weight` / `lora_B.weight` and the peft LoraConfig in the safetensors header
(`lora_adapter_metadata`), exactly what diffusers' `save_lora_weights` writes, so plain diffusers
`pipe.load_lora_weights(dir)` loads it with the right rank and alpha.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignprop_ray.errors import UserError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    init: str = (
        "gaussian"  # peft init_lora_weights: "gaussian" or "default" (Kaiming A); B starts at 0 either way
    )


def attach_lora(unet: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter, keep LoRA params in fp32; return the trainable parameters.

    The random init of A is drawn from `seed` (not the global RNG), so every worker starts from the
    same adapter and a rerun with the same seed starts from the same point.
    """
    from peft import LoraConfig

    from alignprop_ray.engine.models import seeded

    unet.requires_grad_(False)
    init = True if settings.init == "default" else settings.init
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights=init,
        target_modules=list(settings.target_modules),
    )
    with seeded(seed):
        unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed as diffusers saves them (`unet.` prefix, lora_A/lora_B)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


def lora_metadata(unet: torch.nn.Module) -> dict:
    config = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_adapter(unet: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of `unet` to `directory` (atomically replaces the weights file)."""
    return write_adapter(lora_state_dict(unet), lora_metadata(unet), directory)


def write_adapter(state: dict[str, torch.Tensor], config: dict, directory: str | os.PathLike) -> Path:
    """Write a diffusers-format adapter file; the file appears whole or not at all."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()}, sort_keys=True),
    }
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=header)
        os.replace(tmp, directory / WEIGHT_NAME)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter directory (or file): (state dict with `unet.` keys, LoraConfig dict).

    Adapters saved without metadata get diffusers' default reading: alpha = rank.
    """
    from safetensors import safe_open

    path = Path(directory)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"adapter {directory}: no {WEIGHT_NAME} found")
    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise UserError(f"adapter {file}: not a readable safetensors file ({err})") from None
    state = {_peft_key(k): v for k, v in state.items()}
    lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys or len(lora_keys) != len(state):
        raise UserError(f"adapter {file}: not a LoRA adapter (expected only lora_A/lora_B weights)")
    meta = json.loads(header.get(METADATA_KEY, "{}"))
    config = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
    if not config:
        rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        config = {"r": rank, "lora_alpha": rank}
    return state, config


def _peft_key(key: str) -> str:
    """Older diffusers/kohya-style names (`lora.down`/`lora.up`) in peft's spelling (`lora_A`/`lora_B`)."""
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def load_adapter(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load saved adapter weights into the adapter already attached to `unet` (used to resume)."""
    from peft.utils import set_peft_model_state_dict

    state, config = read_adapter(directory)
    ours = unet.peft_config["default"]
    if config.get("r") != ours.r or float(config.get("lora_alpha", 0)) != float(ours.lora_alpha):
        raise UserError(
            f"adapter {directory}: rank/alpha {config.get('r')}/{config.get('lora_alpha')} do not match the "
            f"configured {ours.r}/{ours.lora_alpha}"
        )
    peft_state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, peft_state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"adapter {directory}: keys do not match the model ({(result.unexpected_keys or missing)[0]})"
        )


def load_adapter_like_diffusers(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load an adapter exactly the way `StableDiffusionPipeline.load_lora_weights` does (for sampling)."""
    from diffusers import StableDiffusionPipeline

    read_adapter(directory)  # clear one-line errors before diffusers' own
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(directory), return_lora_metadata=True
    )
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)


# ---------------------------------------------------------------------------------------------------
# Interpolation of two adapters (the paper's reward interpolation).
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Module:
    down: torch.Tensor  # lora_A: (r, in)
    up: torch.Tensor  # lora_B: (out, r)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def mix_adapters(
    a: str | os.PathLike, b: str | os.PathLike, alpha: float, out: str | os.PathLike, method: str = "update"
) -> Path:
    """Write an adapter whose weight update is alpha * dW_a + (1 - alpha) * dW_b.

    method="update" is exact: with dW = s * B @ A (s = lora_alpha / r), the sum is the rank r_a + r_b
    adapter [alpha s_a B_a, (1-alpha) s_b B_b] @ [A_a; A_b], saved with lora_alpha = rank (s = 1).
    method="factors" averages A and B separately, as the AlignProp paper's code did; that is NOT an
    interpolation of the update (the cross terms B_a A_b appear), offered only to reproduce the paper.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    (state_a, cfg_a), (state_b, cfg_b) = read_adapter(a), read_adapter(b)
    mods_a, mods_b = _modules(state_a), _modules(state_b)
    if method == "factors":
        state, config = _mix_factors(mods_a, cfg_a, mods_b, cfg_b, alpha, (a, b))
    elif method == "update":
        state, config = _mix_updates(mods_a, cfg_a, mods_b, cfg_b, alpha)
    else:
        raise UserError(f"--method must be 'update' or 'factors', got {method!r}")
    return write_adapter(state, config, out)


def _modules(state: dict[str, torch.Tensor]) -> dict[str, _Module]:
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".lora_")
        mods.setdefault(name, {})[part] = value.float()
    return {name: _Module(p["A.weight"], p["B.weight"]) for name, p in mods.items()}


def _scale(config: dict) -> float:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("adapters with per-module rank/alpha patterns cannot be mixed")
    return float(config.get("lora_alpha", config["r"])) / float(config["r"])


def _mix_updates(mods_a, cfg_a, mods_b, cfg_b, alpha):
    ra, rb = int(cfg_a["r"]), int(cfg_b["r"])
    wa, wb = alpha * _scale(cfg_a), (1 - alpha) * _scale(cfg_b)
    state = {}
    for name in sorted(mods_a.keys() | mods_b.keys()):
        ma, mb = mods_a.get(name), mods_b.get(name)
        like = ma or mb
        in_f, out_f = like.down.shape[1], like.up.shape[0]
        down_a = ma.down if ma else torch.zeros(ra, in_f)
        up_a = ma.up if ma else torch.zeros(out_f, ra)
        down_b = mb.down if mb else torch.zeros(rb, in_f)
        up_b = mb.up if mb else torch.zeros(out_f, rb)
        state[f"{name}.lora_A.weight"] = torch.cat([down_a, down_b], dim=0).contiguous()
        state[f"{name}.lora_B.weight"] = torch.cat([wa * up_a, wb * up_b], dim=1).contiguous()
    targets = sorted(set(cfg_a.get("target_modules") or []) | set(cfg_b.get("target_modules") or []))
    config = {**cfg_a, "r": ra + rb, "lora_alpha": ra + rb, "target_modules": targets}
    return state, config


def _mix_factors(mods_a, cfg_a, mods_b, cfg_b, alpha, names):
    if mods_a.keys() != mods_b.keys() or cfg_a["r"] != cfg_b["r"] or _scale(cfg_a) != _scale(cfg_b):
        raise UserError(
            f"--method factors needs adapters with the same modules, rank and alpha: {names[0]}, {names[1]}"
        )
    state = {}
    for name, ma in mods_a.items():
        mb = mods_b[name]
        state[f"{name}.lora_A.weight"] = (alpha * ma.down + (1 - alpha) * mb.down).contiguous()
        state[f"{name}.lora_B.weight"] = (alpha * ma.up + (1 - alpha) * mb.up).contiguous()
    return state, dict(cfg_a)
