"""Where reward weights come from, and loading them without unpickling arbitrary objects.

A weight reference in a spec is either a local path or ``hf://<org>/<repo>[/<file>]`` (a Hugging Face
Hub file, or a whole repository for transformers models). Hub references are fetched only when the user
wrote one and downloads are allowed; otherwise they must already be in the local Hugging Face cache.
Loading is safetensors, or ``torch.load(weights_only=True)``: never arbitrary pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignprop_ray.errors import UserError

if TYPE_CHECKING:  # torch is imported where weights are loaded: checking a reference needs none of it
    import torch

HUB_PREFIX = "hf://"


class WeightsError(UserError):
    """A weight reference that cannot be resolved or loaded; ``option`` is the spec key at fault."""

    def __init__(self, option: str, message: str):
        self.option, self.message = option, message
        super().__init__(f"{option}: {message}")


@dataclass(frozen=True)
class WeightsSource:
    """What a weight file is and where a user gets it, for error messages: 'X (get it from Y)'."""

    what: str  # e.g. "the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth"
    where: str  # e.g. a URL or "hf://org/repo/file"

    def missing(self) -> str:
        return f"required: {self.what} (get it from {self.where}; see docs/rewards.md)"


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf://org/repo/sub/file.pt`` -> (``org/repo``, ``sub/file.pt``); a bare repo gives (repo, None)."""
    parts = ref[len(HUB_PREFIX) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{ref!r} is not hf://<org>/<repo>[/<file>]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _hub_offline() -> bool:
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode())


def check_ref(option: str, ref: str | None, source: WeightsSource, *, is_dir: bool = False) -> list[str]:
    """Problems with a weight reference, found without reading or downloading weights."""
    problem = _ref_problem(option, ref, source, is_dir)
    return [f"{option}: {problem}"] if problem else []


def _ref_problem(option: str, ref: str | None, source: WeightsSource, is_dir: bool) -> str | None:
    if not ref:
        return source.missing()
    if not ref.startswith(HUB_PREFIX):
        path = Path(ref).expanduser()
        if path.is_dir() if is_dir else path.is_file():
            return None
        return f"{'directory' if is_dir else 'file'} not found: {ref} ({source.what}; get it from {source.where})"
    try:
        repo, filename = parse_hub_ref(ref)
    except ValueError as err:
        return str(err)
    if not _hub_offline():
        return None  # downloadable at build time; validation never touches the network
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(repo, filename or "config.json"), str):
        return None
    return (
        f"{ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
        f"(download it, or point {option} at a local copy of {source.what})"
    )


def resolve_file(option: str, ref: str | None, source: WeightsSource) -> Path:
    """A local file for ``ref``, downloading a hub file only because the user asked for it by hf:// ref."""
    problem = _ref_problem(option, ref, source, is_dir=False)
    if problem or ref is None:
        raise WeightsError(option, problem or source.missing())
    if not ref.startswith(HUB_PREFIX):
        return Path(ref).expanduser()
    repo, filename = parse_hub_ref(ref)
    if filename is None:
        raise WeightsError(option, f"{ref} names a repository; name the file, e.g. hf://{repo}/<file>")
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename))
    except Exception as err:  # network, auth, missing file: all reported the same way, on one line
        hint = f"{source.what}; download it yourself or give a local path"
        raise WeightsError(option, f"could not fetch {ref}: {type(err).__name__} ({hint})") from err


def resolve_model_dir(option: str, ref: str | None, source: WeightsSource) -> str:
    """A local model directory as is, or the repo id of ``hf://org/repo`` for ``from_pretrained``."""
    hub = ref is not None and ref.startswith(HUB_PREFIX)
    problem = _ref_problem(option, ref, source, is_dir=not hub)
    if problem or ref is None:
        raise WeightsError(option, problem or source.missing())
    return parse_hub_ref(ref)[0] if hub else str(Path(ref).expanduser())


def load_state_dict(option: str, path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a plain torch checkpoint, unwrapping ``state_dict``/``module.``.

    ``torch.load`` runs with ``weights_only=True``: files that need arbitrary classes are refused.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, TorchScript archive, corrupt file: one line for the user
        raise WeightsError(
            option, f"cannot load {path} safely (weights_only): {_first_sentence(err)}"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(option, f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _first_sentence(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.split(". ")[0].replace("``", "")


def load_strict(option: str, module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(strict=True)``, with a one-line error naming a few mismatched keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        )
        raise WeightsError(option, f"{path} does not fit {type(module).__name__}: {detail}")
    module.load_state_dict(state, strict=True)
