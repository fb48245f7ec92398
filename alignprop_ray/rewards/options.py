"""What each reward term of a config accepts, as pydantic models (no torch: `validate` stays cheap).

Every term takes ``weight``, ``objective`` and ``target``; rewards with weights or settings of their own
extend `RewardTerm`. ``check()`` finds what a type cannot: a weights file that does not exist, an hf://
reference that is not cached while offline, an open_clip architecture open_clip does not ship.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignprop_ray.compat import open_clip_arch_exists
from alignprop_ray.fields import FiniteFloat, Int
from alignprop_ray.presets import TINY
from alignprop_ray.rewards.weights import HUB_PREFIX, WeightsSource, check_ref

HEAD_SOURCE = WeightsSource(
    "the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
)
CLIP_L14_SOURCE = WeightsSource(
    "the OpenAI CLIP ViT-L/14 weights for open_clip, open_clip_model.safetensors",
    "hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
)
HPS_SOURCE = WeightsSource(
    "the HPS v2.1 (or v2) checkpoint HPS_v2.1_compressed.pt", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
)
PICKSCORE_SOURCE = WeightsSource("the PickScore_v1 model directory", "hf://yuvalkirstain/PickScore_v1")
CLIP_SOURCE = WeightsSource(
    "an open_clip checkpoint for the chosen arch",
    "the open_clip pretrained list, e.g. "
    "hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
)


NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (128, 0, 255),
    "magenta": (255, 0, 255),
}
_HEX = re.compile(r"#[0-9a-fA-F]{6}")
# BT.601 (JFIF) rows of Cb and Cr, the chroma part of the RGB -> YCbCr matrix used by the JPEG surrogate.
CBCR = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def parse_colour(spec: str) -> tuple[int, int, int]:
    """A colour name of NAMED_COLOURS or '#rrggbb' -> RGB in 0..255; ValueError otherwise (or for a gray,
    which has no hue)."""
    if spec.lower() in NAMED_COLOURS:
        rgb = NAMED_COLOURS[spec.lower()]
    elif _HEX.fullmatch(spec):
        rgb = tuple(int(spec[i : i + 2], 16) for i in (1, 3, 5))
    else:
        raise ValueError(f"{spec!r} is not a colour (a name: {', '.join(NAMED_COLOURS)}; or '#rrggbb')")
    if max(abs(sum(w * c for w, c in zip(row, rgb, strict=True))) for row in CBCR) < 1e-6:
        raise ValueError(f"{rgb} is a gray: it has no hue")
    return rgb


class RuntimeEnv(BaseModel):
    """The Ray runtime_env of a served reward's replicas: its own packages and environment, which never
    meet the trainer's. Passed to Ray as written (Ray's runtime_env docs give each key's forms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment variables of the replicas"
    )
    pip: list[str] | dict[str, Any] | None = Field(
        None, description="pip requirements installed into the replicas' own virtualenv (needs the registry)"
    )
    uv: list[str] | dict[str, Any] | None = Field(None, description="as pip, installed with uv")
    conda: str | dict[str, Any] | None = Field(None, description="a conda env name or environment.yml dict")
    working_dir: str | None = Field(None, description="a local folder or remote URI shipped to the replicas")
    py_modules: list[str] | None = Field(None, description="local folders or URIs put on the replicas' path")

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class ServeOptions(BaseModel):
    """How a served reward runs as a Ray Serve deployment (docs/rewards.md, "Served rewards"). Every trial of a
    sweep whose term has the same reward options and these same settings uses one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: Int = Field(1, ge=0, description="replicas kept up (0: scale to zero when idle)")
    max_replicas: Int = Field(1, ge=1, description="replicas at most; capacity counts this many")
    target_ongoing_requests: FiniteFloat = Field(
        2.0, gt=0, description="requests in flight per replica the autoscaler aims for"
    )
    max_ongoing_requests: Int = Field(16, ge=1, description="requests one replica takes at once")
    num_cpus: FiniteFloat = Field(1.0, ge=0, description="CPUs per replica (torch threads: at least 1)")
    num_gpus: FiniteFloat = Field(0.0, ge=0, description="GPUs per replica; fractional shares a GPU")
    max_batch_size: Int = Field(
        8, ge=1, description="requests (from any worker of any trial) scored in one forward pass"
    )
    batch_wait_timeout_s: FiniteFloat = Field(
        0.01, ge=0, description="seconds a replica waits for a batch to fill before it scores"
    )
    request_timeout_s: FiniteFloat = Field(
        120.0, gt=0, description="seconds a training step waits for one request before it retries (once)"
    )
    start_timeout_s: FiniteFloat = Field(
        600.0,
        gt=0,
        description="seconds to wait for the replicas to start (runtime_env built, weights loaded)",
    )
    runtime_env: RuntimeEnv = Field(default_factory=RuntimeEnv, description="the replicas' own runtime_env")

    def check(self) -> list[str]:
        if self.min_replicas > self.max_replicas:
            return [f"min_replicas: {self.min_replicas} is above max_replicas ({self.max_replicas})"]
        return []

    def replica_resources(self) -> dict[str, float]:
        """What one replica holds in the cluster (the sweep's capacity subtracts max_replicas of these)."""
        return {k: v for k, v in {"CPU": self.num_cpus, "GPU": self.num_gpus}.items() if v}


class RewardTerm(BaseModel):
    """One term of the mixture: ``weight * r`` (maximize) or ``-weight * |target - r|`` (target)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: FiniteFloat = Field(1.0, description="weight in the mixture; may be negative (a penalty)")
    objective: Literal["maximize", "target"] | None = Field(
        None, description="maximize r, or minimize |target - r|; default: target when a target is given"
    )
    target: FiniteFloat | None = Field(None, description="the value to approach (objective: target)")
    serve: ServeOptions | None = Field(
        None,
        description="run this reward as a Ray Serve deployment shared by every worker and trial (true for "
        "the defaults, or its settings); null: inside each worker",
    )

    @field_validator("serve", mode="before")
    @classmethod
    def _serve_shorthand(cls, value: Any) -> Any:
        """`serve: true` is the default settings, `serve: false` none."""
        if value is True:
            return {}
        return None if value is False else value

    @property
    def mode(self) -> str:
        """The objective in force: `objective`, else `target` when a target is given, else `maximize`."""
        return self.objective or ("target" if self.target is not None else "maximize")

    def check(self) -> list[str]:
        """Problems found without loading weights, each ``"<option>: <message>"``; subclasses add theirs."""
        problems = [f"serve.{problem}" for problem in self.serve.check()] if self.serve else []
        if self.mode == "maximize" and self.target is not None:
            return [*problems, "target: only used with objective: target"]
        if self.mode == "target" and self.target is None:
            return [*problems, "target: required with objective: target"]
        return problems

    def model_options(self) -> dict[str, Any]:
        """What the reward model is built from: every option but the mixture's (weight, objective, target)
        and where it runs (serve). Two terms with the same name and model options score alike."""
        return self.model_dump(mode="json", exclude={"weight", "objective", "target", "serve"})


class HueTerm(RewardTerm):
    colour: str = Field("orange", description="a colour name (red, orange, ...) or '#rrggbb'")

    def check(self) -> list[str]:
        try:
            parse_colour(self.colour)
        except ValueError as err:
            return [*super().check(), f"colour: {err}"]
        return super().check()


class OpenClipTerm(RewardTerm):
    path: str | None = Field(
        None, description="open_clip checkpoint (path or hf:// ref); not with arch: tiny"
    )
    arch: str = Field("ViT-L-14-quickgelu", description="an open_clip model name, or `tiny` for tests")
    seed: Int = Field(0, description="random init with arch: tiny")

    source: ClassVar[WeightsSource] = CLIP_SOURCE  # for messages about a missing `path`

    def check(self) -> list[str]:
        return super().check() + self._weights_problems()

    def _weights_problems(self) -> list[str]:
        if self.arch == TINY:
            return check_ref("path", self.path, self.source) if self.path else []
        if not open_clip_arch_exists(self.arch):
            return [f"arch: unknown open_clip architecture {self.arch!r} (or 'tiny')"]
        return check_ref("path", self.path, self.source)


class HpsTerm(OpenClipTerm):
    # HPS v2 and v2.1 fine-tune open_clip ViT-H-14 (laion2B)
    arch: str = Field("ViT-H-14", description="open_clip ViT-H-14, or `tiny` for tests")

    source: ClassVar[WeightsSource] = HPS_SOURCE


class AestheticTerm(RewardTerm):
    path: str | None = Field(
        None, description="the head .pth (path or hf:// ref); random init with arch: tiny"
    )
    clip_path: str | None = Field(
        None, description="open_clip ViT-L/14 OpenAI weights; unused with arch: tiny"
    )
    # OpenAI's ViT-L/14 uses QuickGELU
    arch: str = Field("ViT-L-14-quickgelu", description="the CLIP tower, or `tiny` for offline tests")
    seed: Int = Field(0, description="random init of whatever is not loaded (tiny towers, head without path)")
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="random: seeded random weights for `arch` and the head, nothing loaded (benchmarks of "
        "the system at a real model's size; the score means nothing)",
    )

    def check(self) -> list[str]:
        return super().check() + self._weights_problems()

    def _weights_problems(self) -> list[str]:
        if self.arch == TINY:
            return check_ref("path", self.path, HEAD_SOURCE) if self.path else []
        if not open_clip_arch_exists(self.arch):
            return [f"arch: unknown open_clip architecture {self.arch!r} (or 'tiny')"]
        if self.init == "random":
            given = [name for name in ("path", "clip_path") if getattr(self, name)]
            return [f"{name}: not loaded with init: random" for name in given]
        return check_ref("path", self.path, HEAD_SOURCE) + check_ref(
            "clip_path", self.clip_path, CLIP_L14_SOURCE
        )


class PickScoreTerm(RewardTerm):
    path: str | None = Field(None, description="PickScore_v1 directory, or hf://yuvalkirstain/PickScore_v1")
    arch: Literal["clip-h", "tiny"] = Field(
        "clip-h", description="`tiny`: random-init CLIP for offline tests"
    )
    seed: Int = Field(0, description="random init with arch: tiny")

    def check(self) -> list[str]:
        if self.arch == TINY:
            return super().check()
        hub = self.path is not None and self.path.startswith(HUB_PREFIX)
        return super().check() + check_ref("path", self.path, PICKSCORE_SOURCE, is_dir=not hub)


class PluginTerm(RewardTerm):
    """A plugin reward's term: its `options` go to the plugin's constructor when it is a class."""

    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of a plugin class's constructor"
    )
