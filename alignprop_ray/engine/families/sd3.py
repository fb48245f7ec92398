"""Stable Diffusion 3 / 3.5: the MMDiT transformer with CLIP-L + CLIP-G (+ optional T5) text encoders,
sampled with flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, with its `shift`).

Encoding is `StableDiffusion3Pipeline.encode_prompt`: both CLIPs' penultimate hidden states concatenated
and zero-padded to T5's width, then T5's 256 tokens appended along the sequence (zeros when T5 is
absent, as diffusers allows); the pooled embedding is both CLIPs' projections concatenated. An Euler flow
step, x <- x + (sigma_next - sigma) * v, is as differentiable as a DDIM step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignprop_ray.engine import schedulers
from alignprop_ray.engine.families.base import Conditioning, DiffusionParts, Family
from alignprop_ray.engine.families.sd import clip_tokens
from alignprop_ray.engine.families.tiny import clip_text_config, clip_tokenizer, seeded, t5_tokenizer

T5_TOKENS = 256  # the pipeline's max_sequence_length default


class SD3(Family):
    def load(self, source: str, dtype: torch.dtype, model_index: dict) -> DiffusionParts:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        from alignprop_ray.engine.schedulers import load_scheduler

        tokenizers = [
            CLIPTokenizer.from_pretrained(source, subfolder=f) for f in ("tokenizer", "tokenizer_2")
        ]
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(source, subfolder=f, dtype=dtype)
            for f in ("text_encoder", "text_encoder_2")
        ]
        if _present(model_index, "text_encoder_3"):
            tokenizers.append(T5Tokenizer.from_pretrained(source, subfolder="tokenizer_3"))
            encoders.append(T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", dtype=dtype))
        return DiffusionParts(
            family=self,
            tokenizers=tokenizers,
            text_encoders=encoders,
            denoiser=SD3Transformer2DModel.from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype
            ),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
            scheduler=load_scheduler(source, self.schedulers),
            pipeline_config=model_index,
        )

    def build_tiny(self, seed: int, t5: bool = True) -> DiffusionParts:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

        tiny = self.row.tiny
        tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")]
        t5_tok = t5_tokenizer() if t5 else None
        with seeded(seed):
            transformer = SD3Transformer2DModel(**tiny["transformer"])
            vae = AutoencoderKL(**tiny["vae"])
            encoders = [
                CLIPTextModelWithProjection(clip_text_config(**tiny[name]))
                for name in ("text_encoder", "text_encoder_2")
            ]
            if t5:
                encoders.append(T5EncoderModel(T5Config(vocab_size=len(t5_tok), **tiny["text_encoder_3"])))
                tokenizers.append(t5_tok)
        return DiffusionParts(self, tokenizers, encoders, transformer, vae, self.tiny_scheduler(), {})

    def pipeline(self, parts: DiffusionParts):
        from diffusers import StableDiffusion3Pipeline

        t5 = len(parts.text_encoders) == 3
        return StableDiffusion3Pipeline(
            transformer=parts.denoiser,
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer_2=parts.tokenizers[1],
            text_encoder_3=parts.text_encoders[2] if t5 else None,
            tokenizer_3=parts.tokenizers[2] if t5 else None,
        )

    def encode(self, parts, prompts, negative_prompt, guided, resolution) -> Conditioning:
        embeds, pooled = self._embed(parts, list(prompts))
        if guided:
            uncond, uncond_pooled = self._embed(parts, [negative_prompt or ""] * len(prompts))
            embeds, pooled = torch.cat([uncond, embeds]), torch.cat([uncond_pooled, pooled])
        tensors = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        return Conditioning({k: v.to(parts.dtype) for k, v in tensors.items()}, guided)

    @staticmethod
    def _embed(parts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device, clip_dtype = parts.device, parts.text_encoders[0].dtype
        length = parts.tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        hidden, pooled = [], []
        with torch.no_grad():
            for tokenizer, encoder in zip(parts.tokenizers[:2], parts.text_encoders[:2], strict=True):
                out = encoder(clip_tokens(tokenizer, prompts, device, length), output_hidden_states=True)
                pooled.append(out[0])
                hidden.append(out.hidden_states[-2].to(clip_dtype))
            clip = torch.cat(hidden, dim=-1)
            t5 = _t5_embeds(parts, prompts, clip_dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def denoise(self, denoiser, model_input, t, cond) -> torch.Tensor:
        timestep = t.expand(model_input.shape[0])
        return denoiser(hidden_states=model_input, timestep=timestep, **cond.tensors, return_dict=False)[0]

    def timestep_options(self, parts, steps: int, resolution: int) -> dict:
        """`mu` from the latent patch count when the scheduler asks for dynamic shifting (some SD3.5
        pipelines), as StableDiffusion3Pipeline computes it."""
        config = parts.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        patches = resolution // parts.vae_scale_factor // parts.denoiser.config.patch_size
        return {"mu": schedulers.dynamic_shift(config, patches * patches, default_max_shift=1.16)}

    def initial_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise  # flow matching starts from pure noise at sigma = 1

    def model_input(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # the MMDiT sees x_t as is

    def vae_input(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def load_lora_like_diffusers(self, denoiser: torch.nn.Module, directory: str) -> None:
        pipeline = self.pipeline_type()
        state, metadata = pipeline.lora_state_dict(directory, return_lora_metadata=True)
        pipeline.load_lora_into_transformer(state, denoiser, metadata=metadata)

    def is_denoiser(self, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"


def _t5_embeds(parts, prompts: list[str], clip_dtype: torch.dtype) -> torch.Tensor:
    """T5's last hidden state over 256 tokens, or zeros of the transformer's joint width without T5."""
    if len(parts.text_encoders) < 3:
        width = parts.denoiser.config.joint_attention_dim
        return torch.zeros(len(prompts), T5_TOKENS, width, device=parts.device, dtype=clip_dtype)
    tokenizer, encoder = parts.tokenizers[2], parts.text_encoders[2]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=T5_TOKENS,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return encoder(ids.to(parts.device))[0].to(encoder.dtype)


def _present(model_index: dict, component: str) -> bool:
    """Whether model_index.json lists a component ([null, null] marks one saved as absent)."""
    entry = model_index.get(component)
    return isinstance(entry, list) and entry[0] is not None
