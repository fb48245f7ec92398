"""eval/base_fidelity (`eval.base_fidelity`): how close each eval image stays to the base model's image of the
same prompt and seed.

At step 0 every LoRA B matrix is zero, so the adapter changes nothing and the step-0 evaluation's images are
the base model's. Their features are the reference: each later eval image (same prompt, same seed, same
initial noise) is compared with its own reference image, in the feature space the config names, with the
diversity metrics' distance (rewards/diversity.py):

    pixels: 1 - RMS difference of the 32 x 32 area-downsampled images (1: the same image, 0: black vs white)
    clip:   cosine similarity of the unit CLIP image embeddings (1: the same embedding)

It is a drift measure: it falls as training moves the model away from the base model, whether the images
get better or worse. It says nothing of quality and is not a reward (a reward sees only an image and its
prompt; this needs the base model's image too). Read it beside the rewards: reward up with fidelity near 1
is a light touch; reward up with fidelity far down is a model that left its base behind.

The reference lives with the run: rank 0 writes it into every checkpoint (REFERENCE_FILE, the features of
the step-0 images, which MLflow also holds as the step-0 eval grid), and a resumed run reads it back from
the checkpoint it resumes from, so it compares with the same images, never with a regenerated copy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from alignprop_ray.engine.distributed import world

REFERENCE_FILE = "base_fidelity_reference.pt"  # in a checkpoint: {"space": ..., "features": (N, D)}


def similarity(features: Tensor, reference: Tensor, space: str) -> Tensor:
    """(N,) similarity of each image's features to its reference's: 1 - RMS pixel difference (`pixels`),
    or the cosine of the embeddings (`clip`)."""
    if space == "pixels":
        return 1.0 - (features.double() - reference.double()).pow(2).mean(dim=1).sqrt()
    return F.cosine_similarity(features.double(), reference.double(), dim=1)


class BaseFidelity:
    """The feature model of one `eval.base_fidelity` setting, and the run's step-0 reference."""

    def __init__(self, settings, device: torch.device):
        self.device = device
        self._clip = None
        if settings.space == "clip":
            from alignprop_ray.errors import UserError
            from alignprop_ray.rewards.diversity import clip_features
            from alignprop_ray.rewards.weights import WeightsError

            try:
                self._clip = clip_features(settings.arch, settings.path, seed=settings.seed, device=device)
            except WeightsError as err:
                raise UserError(f"eval.base_fidelity.{err.option}: {err.message}") from err

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int) -> Tensor:
        """(B, D) features of images in [0, 1], on the CPU; quantized to 8 bits first, as logged."""
        from alignprop_ray.rewards.diversity import pixel_features

        images = (images * 255).round() / 255
        if self._clip is None:
            return pixel_features(images).cpu()
        chunks = [
            self._clip(images[i : i + batch_size].to(self.device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


_MODEL: dict[tuple[str, str], BaseFidelity] = {}
_REFERENCE: dict[str, object] = {}  # the step-0 reference of the run this worker trains: space, features


def model(settings, device: torch.device) -> BaseFidelity:
    """The BaseFidelity of `settings` on `device`, built once per worker (a new setting replaces it)."""
    key = (json.dumps(settings.model_dump(mode="json"), sort_keys=True), str(device))
    if key not in _MODEL:
        _MODEL.clear()
        _MODEL[key] = BaseFidelity(settings, device)
    return _MODEL[key]


def shard_features(settings, device: torch.device, images: Tensor, batch_size: int) -> Tensor | None:
    """This worker's eval images' features (None when eval.base_fidelity is off): a column that evaluate()
    gathers in image order with the others."""
    return None if settings is None else model(settings, device).features(images, batch_size)


def measure(settings, features: Tensor | None, step: int) -> Tensor | None:
    """(N,) base fidelity of every eval image, or None (off, or no reference to compare with).

    At step 0 the features become the reference (and every value is 1)."""
    if settings is None or features is None:
        return None
    space = json.dumps(settings.model_dump(mode="json"), sort_keys=True)
    if step == 0:
        _REFERENCE.clear()
        _REFERENCE.update(space=space, features=features.clone())
    reference = _REFERENCE.get("features")
    if reference is None or _REFERENCE.get("space") != space or reference.shape != features.shape:
        _say_once(
            "eval/base_fidelity is not logged: no step-0 reference of these eval images in this space "
            "(the run resumed from a checkpoint written without eval.base_fidelity)"
        )
        return None
    return similarity(features, reference, settings.space).float()


def forget() -> None:
    """A run starts (or restarts) in this worker: no reference until its step 0 or its checkpoint gives one."""
    _REFERENCE.clear()
    _SAID.clear()


def save_reference(directory: Path) -> None:
    """Write the reference into a checkpoint being written (nothing when there is none)."""
    if "features" in _REFERENCE:
        torch.save(dict(_REFERENCE), Path(directory) / REFERENCE_FILE)


def read_reference(directory: Path) -> dict | None:
    """The reference a checkpoint holds, None if it holds none; ValueError naming the file if it is not one
    (train/checkpoint.py `restore` reads that as a damaged checkpoint)."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # anything torch raises on a file we wrote means it is not what we wrote
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise ValueError(f"{REFERENCE_FILE}: {lines[0][:200]}") from err
    if not isinstance(state, dict) or not isinstance(state.get("features"), Tensor):
        raise ValueError(f"{REFERENCE_FILE}: no reference features in it")
    return state


def keep(reference: dict | None) -> None:
    """Make a checkpoint's reference the run's (after the checkpoint was applied)."""
    forget()
    if reference is not None:
        _REFERENCE.update(reference)


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    if world()[0] == 0 and line not in _SAID:
        _SAID.add(line)
        sys.stdout.write(f"[alignprop] {line}\n")
        sys.stdout.flush()
