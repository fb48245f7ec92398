"""The served model: a base diffusion model with a LoRA adapter, drawing one image per request row.

A request is rows of `prompt` and optional params `seed`, `steps` and `guidance`; the answer is one base64
PNG per row, the images that `alignprop-ray sample --model BASE --adapter ADAPTER --prompt P0 --prompt P1
... --seed S --steps N --guidance G` writes, with the model's eta, negative prompt, resolution and dtype. The base model is a
reference (`tiny`, a hub id, or a pipeline directory on the serving machine), loaded as `sample` loads it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import mlflow.pyfunc
import pandas as pd

from alignprop_ray.errors import UserError

ADAPTER = "adapter"  # the model's artifact: the adapter folder, as training logs it


@dataclass(frozen=True)
class ImageModelSettings:
    """What the model draws with besides the adapter: the base model and sampler settings of the run that
    trained it. Saved as the model's metadata (shown in the registry) and its model_config (read on load);
    `steps`, `guidance` and `seed` are defaults that each request may change."""

    base_model: str  # 'tiny', a hub id, or a local diffusers pipeline directory
    family: str  # sd | sdxl | sd3 | flux | auto (read from the pipeline)
    dtype: str  # of the frozen base: float32 | float16 | bfloat16
    resolution: int | None  # pixels; None: the model's native size
    steps: int
    guidance: float
    eta: float
    negative_prompt: str
    seed: int = 0  # `alignprop-ray sample`'s default

    # training run param (config.schema flat_params) -> field
    RUN_PARAMS: ClassVar[dict[str, str]] = {
        "model.pretrained": "base_model",
        "model.family": "family",
        "model.dtype": "dtype",
        "model.resolution": "resolution",
        "sampling.steps": "steps",
        "sampling.guidance_scale": "guidance",
        "sampling.eta": "eta",
        "sampling.negative_prompt": "negative_prompt",
    }

    @classmethod
    def from_run_params(cls, params: dict[str, str], run_id: str) -> ImageModelSettings:
        missing = [key for key in cls.RUN_PARAMS if key not in params]
        if missing:
            raise UserError(f"run {run_id} has no {missing[0]} param: not a training run of alignprop-ray")
        text = {"base_model", "family", "dtype", "negative_prompt"}
        return cls(
            **{
                name: params[key] if name in text else json.loads(params[key])
                for key, name in cls.RUN_PARAMS.items()
            }
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageModelSettings:
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def signature(settings: ImageModelSettings):
    """Rows of `prompt` in, one `image` (base64 PNG) out; `seed`, `steps` and `guidance` as the request's
    params, with the run's settings as defaults. Row i is drawn with seed + i, as `alignprop-ray sample
    --prompt P0 --prompt P1 ... --seed S` draws prompt i."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("seed", "long", settings.seed),
            ParamSpec("steps", "long", settings.steps),
            ParamSpec("guidance", "double", settings.guidance),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "image")]),
        params=params,
    )


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    seed: int  # of the first prompt; prompt i: seed + i
    steps: int
    guidance: float


class ImageModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model. `mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:1"})` picks the
    device; by default CUDA where there is one, as `alignprop-ray sample`."""

    def load_context(self, context) -> None:
        import torch

        from alignprop_ray.engine.lora import load_adapter_like_diffusers
        from alignprop_ray.engine.models import DTYPES, load_parts

        config = dict(context.model_config or {})
        self.settings = s = ImageModelSettings.from_config(config)
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.parts = load_parts(s.base_model, DTYPES[s.dtype], device, family=s.family)
        load_adapter_like_diffusers(self.parts.denoiser, context.artifacts[ADAPTER])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        request = parse_request(model_input, params or {}, self.settings)
        images = [self.draw(prompt, request.seed + i, request) for i, prompt in enumerate(request.prompts)]
        return pd.DataFrame({"image": [png_base64(image) for image in images]})

    def draw(self, prompt: str, seed: int, request: Request):
        """One image as a PIL image, drawn as `alignprop-ray sample` draws it (one prompt and seed a call)."""
        from alignprop_ray.engine.images import to_pil
        from alignprop_ray.engine.sampler import SamplerSettings, generate

        s = self.settings
        sampler = SamplerSettings.for_sampling(request.steps, request.guidance, s.eta, s.negative_prompt)
        images = generate(self.parts, [prompt], [seed], sampler, resolution=s.resolution)
        return to_pil(images[0])


def parse_request(model_input, params: dict[str, Any], settings: ImageModelSettings) -> Request:
    """The prompts (a DataFrame's `prompt` column, a list of strings or of {"prompt": ...}) and the params;
    absent params take the model's defaults. A bad value fails the call in one line (HTTP 400 served)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if isinstance(model_input, pd.DataFrame):
        prompts = model_input["prompt"].tolist() if "prompt" in model_input else []
    else:
        prompts = [item["prompt"] if isinstance(item, dict) else item for item in model_input]
    request = Request(
        prompts,
        int(params.get("seed", settings.seed)),
        int(params.get("steps", settings.steps)),
        float(params.get("guidance", settings.guidance)),
    )
    guidance = request.guidance
    problems = {
        "send at least one prompt": bool(prompts),
        "every prompt must be a non-empty string": all(isinstance(p, str) and p.strip() for p in prompts),
        f"seed must be >= 0, got {request.seed}": request.seed >= 0,
        f"steps must be >= 1, got {request.steps}": request.steps >= 1,
        f"guidance must be >= 0, got {guidance}": math.isfinite(guidance) and guidance >= 0,
    }
    for problem, ok in problems.items():
        if not ok:
            raise MlflowException(problem, INVALID_PARAMETER_VALUE)
    return request


def png_base64(image) -> str:
    """A PIL image as PNG bytes (PIL's defaults, as `alignprop-ray sample` saves it) in base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
