"""LoRA adapters on the denoiser: attach (peft), save/load in the diffusers format, and interpolate.

On disk an adapter is a directory holding `pytorch_lora_weights.safetensors` with keys
`<denoiser>.<module>.lora_A.weight` / `lora_B.weight` (`unet.` for sd/sdxl, `transformer.` for sd3) and
the peft LoraConfig in the safetensors header (`lora_adapter_metadata`), exactly what the family's
pipeline class writes with `save_lora_weights`, so plain diffusers `pipe.load_lora_weights(dir)` loads it
with the right rank and alpha. The header also names the family (`alignprop.family`), so an adapter is
refused, in one line, by a model of another family.

Every function takes the denoiser module; its family is read off it (engine/families).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignprop_ray.engine.families import FAMILIES, family_of, get_family
from alignprop_ray.engine.families.tiny import seeded
from alignprop_ray.errors import UserError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FAMILY_KEY = "alignprop.family"  # our own header entry; diffusers reads only its own keys


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape; every value comes from the experiment config (model.lora: section)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | None  # None: the family's default (its row's lora_targets)
    init: str  # peft init_lora_weights: "gaussian" or "default" (Kaiming A); B starts at 0 either way


@dataclass
class Adapter:
    """An adapter file's contents: peft keys without the denoiser prefix, and its LoraConfig dict."""

    state: dict[str, torch.Tensor]
    config: dict
    prefix: str  # the denoiser name its keys carry in the file: unet | transformer
    family: str | None  # as recorded by us; None for adapters written elsewhere


def attach_lora(denoiser: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a LoRA adapter, keep LoRA params in fp32; return the trainable parameters.

    The random init of A is drawn from `seed` (not the global RNG), so every worker starts from the
    same adapter and a rerun with the same seed starts from the same point.
    """
    from peft import LoraConfig

    family = family_of(denoiser)
    targets = list(settings.target_modules or family.lora_targets)
    denoiser.requires_grad_(False)
    init = True if settings.init == "default" else settings.init
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, init_lora_weights=init, target_modules=targets
    )
    try:
        with seeded(seed):
            denoiser.add_adapter(config)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        raise UserError(
            f"model.lora.target_modules: none of {targets} is a module of the {family.name} denoiser"
        ) from None
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_metadata(denoiser: torch.nn.Module) -> dict:
    config = denoiser.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_adapter(denoiser: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of `denoiser` to `directory` (atomically replaces the weights file)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    return write_adapter(state, lora_metadata(denoiser), directory, family_of(denoiser).name)


def write_adapter(
    state: dict[str, torch.Tensor],
    config: dict,
    directory: str | os.PathLike,
    family: str | None,
    prefix: str | None = None,
) -> Path:
    """Write an adapter (peft keys, LoraConfig dict) with the family pipeline's own `save_lora_weights`.

    `family` None (an adapter from elsewhere whose family is not recorded): written by the first family
    whose denoiser is `prefix`, without a family entry. The file is written into a temporary folder
    inside `directory` and moved into place, so it appears whole or not at all, even if the process dies
    mid-write.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    writer = (
        get_family(family)
        if family
        else next(f for f in map(get_family, FAMILIES) if f.denoiser_name == prefix)
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        writer.save_lora(tmp, state, config)
        written = Path(tmp) / WEIGHT_NAME
        if family:  # record the family in the header diffusers wrote
            with safe_open(str(written), framework="pt") as f:
                tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
            save_file(tensors, str(written), metadata={**header, FAMILY_KEY: family})
        os.replace(written, directory / WEIGHT_NAME)
    return directory


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read an adapter directory (or file).

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
    prefixes = {k.split(".", 1)[0] for k in state}
    if not lora_keys or len(lora_keys) != len(state) or len(prefixes) != 1:
        raise UserError(
            f"adapter {file}: not a LoRA adapter of one denoiser (expected only <denoiser>.*.lora_A/lora_B "
            "weights)"
        )
    prefix = prefixes.pop()
    family = header.get(FAMILY_KEY)
    if family is not None and family not in FAMILIES:
        raise UserError(f"adapter {file}: unknown {FAMILY_KEY} {family!r} (known: {', '.join(FAMILIES)})")
    meta = json.loads(header.get(METADATA_KEY, "{}"))
    config = {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")}
    if not config:
        rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        config = {"r": rank, "lora_alpha": rank}
    state = {k.removeprefix(f"{prefix}."): v for k, v in state.items()}
    _check_pairs(state, file)
    return Adapter(state, config, prefix, family)


def _check_pairs(state: dict[str, torch.Tensor], file: Path) -> None:
    """Each adapted module has a lora_A and a lora_B weight of one rank (A: (r, in, ...), B: (out, r, ...))."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".lora_")
        modules.setdefault(name, {})[part.split(".")[0]] = value
    for name, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise UserError(f"adapter {file}: {name} has no {missing} weight (an incomplete adapter)")
        a, b = parts["A"], parts["B"]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            raise UserError(
                f"adapter {file}: {name}.lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank"
            )


def _peft_key(key: str) -> str:
    """Older diffusers/kohya-style names (`lora.down`/`lora.up`) in peft's spelling (`lora_A`/`lora_B`)."""
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def check_adapter_fits(denoiser: torch.nn.Module, adapter: Adapter, where: str | os.PathLike) -> None:
    """One clear line if `adapter` was made for another family or another model than `denoiser`."""
    family = family_of(denoiser)
    if adapter.family is not None and adapter.family != family.name:
        raise UserError(f"adapter {where}: made for a {adapter.family} model, but the model is {family.name}")
    if adapter.prefix != family.denoiser_name:
        raise UserError(
            f"adapter {where}: adapts a {adapter.prefix}, but a {family.name} model's denoiser is a "
            f"{family.denoiser_name} (an adapter of another family)"
        )
    modules = dict(denoiser.named_modules())
    for key, value in adapter.state.items():
        name, _, part = key.rpartition(".lora_")
        module = modules.get(name)
        if module is None:
            raise UserError(
                f"adapter {where}: module {name} is not in this {family.name} denoiser (an adapter of "
                "another model?)"
            )
        features = getattr(module, "in_features" if part.startswith("A") else "out_features", None)
        size = value.shape[1] if part.startswith("A") else value.shape[0]
        if features is not None and features != size:
            raise UserError(
                f"adapter {where}: {key} has {size} features where this {family.name} model's {name} has "
                f"{features} (an adapter of another model?)"
            )


def load_adapter(denoiser: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load saved adapter weights into the adapter already attached to `denoiser` (used to resume)."""
    from peft.utils import set_peft_model_state_dict

    adapter = read_adapter(directory)
    check_adapter_fits(denoiser, adapter, directory)
    ours, config = denoiser.peft_config["default"], adapter.config
    if config.get("r") != ours.r or float(config.get("lora_alpha", 0)) != float(ours.lora_alpha):
        raise UserError(
            f"adapter {directory}: rank/alpha {config.get('r')}/{config.get('lora_alpha')} do not match the "
            f"configured {ours.r}/{ours.lora_alpha}"
        )
    result = set_peft_model_state_dict(denoiser, adapter.state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(
            f"adapter {directory}: keys do not match the model ({(result.unexpected_keys or missing)[0]})"
        )


def load_adapter_like_diffusers(denoiser: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load an adapter exactly the way the family pipeline's `load_lora_weights` does (for sampling)."""
    check_adapter_fits(denoiser, read_adapter(directory), directory)  # one-line errors before diffusers'
    family_of(denoiser).load_lora_like_diffusers(denoiser, str(directory))


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
    """Write an adapter that mixes adapters `a` and `b` with weight `alpha` on `a`.

    method="update" is exact: its weight update is alpha * dW_a + (1 - alpha) * dW_b. With
    dW = s * B @ A (s = lora_alpha / r), that sum is the rank r_a + r_b adapter
    [alpha s_a B_a, (1-alpha) s_b B_b] @ [A_a; A_b], saved with lora_alpha = rank (s = 1).

    method="factors" is the AlignProp paper's own mixing (its `evaluate_soup`, main.py:296-302 at commit
    185d154): A and B are averaged separately, so the update is
    s * (alpha B_a + (1-alpha) B_b) @ (alpha A_a + (1-alpha) A_b)
      = alpha^2 dW_a + (1-alpha)^2 dW_b + alpha (1-alpha) s (B_a A_b + B_b A_a),
    not an interpolation of the updates. Mixed with the base model (b a zero adapter; the paper's
    `resume_from_2 = "same"`, which scales both factors by the coefficient) the update is alpha^2 dW_a: it
    shrinks as the coefficient squared, where "update" shrinks it linearly. Offered to reproduce the paper's
    mixing figures; docs/fidelity.md.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    adapter_a, adapter_b = read_adapter(a), read_adapter(b)
    family = _common_family(adapter_a, adapter_b, (a, b))
    cfg_a, cfg_b = adapter_a.config, adapter_b.config
    mods_a, mods_b = _modules(adapter_a.state), _modules(adapter_b.state)
    _check_same_shapes(mods_a, mods_b, (a, b))
    if method == "factors":
        state, config = _mix_factors(mods_a, cfg_a, mods_b, cfg_b, alpha, (a, b))
    elif method == "update":
        state, config = _mix_updates(mods_a, cfg_a, mods_b, cfg_b, alpha)
    else:
        raise UserError(f"--method must be 'update' or 'factors', got {method!r}")
    return write_adapter(state, config, out, family, adapter_a.prefix)


def _common_family(a: Adapter, b: Adapter, names) -> str | None:
    """The family both adapters belong to (None when neither recorded it: then their keys must agree)."""
    recorded = {x.family for x in (a, b)} - {None}
    if a.prefix != b.prefix or len(recorded) > 1:
        raise UserError(
            f"cannot mix adapters of different model families: {names[0]} ({a.family or a.prefix}), "
            f"{names[1]} ({b.family or b.prefix})"
        )
    return recorded.pop() if recorded else None


def _check_same_shapes(mods_a: dict[str, _Module], mods_b: dict[str, _Module], names) -> None:
    """A module adapted by both must have the same input and output features in both."""
    for name in sorted(mods_a.keys() & mods_b.keys()):
        ma, mb = mods_a[name], mods_b[name]
        shape_a, shape_b = (ma.down.shape[1:], ma.up.shape[0]), (mb.down.shape[1:], mb.up.shape[0])
        if shape_a != shape_b:
            raise UserError(
                f"cannot mix {names[0]} and {names[1]}: their {name} weights differ in shape "
                f"(in/out {tuple(shape_a[0])}/{shape_a[1]} vs {tuple(shape_b[0])}/{shape_b[1]}; adapters of "
                "different models?)"
            )


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
