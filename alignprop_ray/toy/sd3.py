"""The flow-matching toy: an SD3-shaped pipeline (MMDiT `SD3Transformer2DModel`, CLIP-L + CLIP-G text
encoders without T5, a 16-channel VAE, `FlowMatchEulerDiscreteScheduler` with SD3's shift 3) trained with
SD3's rectified-flow loss on the toy-shapes captions.

Two things keep it small and fast enough for a CPU, without changing what the pipeline computes:

- **A grammar-sized CLIP vocabulary.** Two CLIP embedding tables over the full 49408-token vocabulary, and
  two copies of its tokenizer file, would weigh 23 MB at toy width. `grammar_clip_tokenizer` keeps CLIP's
  byte symbols and only the merges that build the grammar's words, in CLIP's order: every caption
  tokenizes into the same pieces as with the full tokenizer (tests/test_toy_model.py), any other text
  still tokenizes (into smaller pieces), and the tables have a few hundred rows.
- **T5's absent tokens counted once.** Without T5, StableDiffusion3Pipeline appends 256 zero tokens to the
  77 CLIP tokens; they enter the MMDiT as 256 identical context tokens (the context embedder's bias), 3/4
  of the transformer's work. Identical tokens have identical outputs, and 256 identical keys in a softmax
  weigh as one key whose logit is raised by log(256). Training therefore passes one zero token and runs
  the joint attention with that bias (`RepeatedTokenJointAttention`): the same function of the weights
  (tests/test_toy_model.py compares it with the pipeline's 333-token call), about 3x cheaper. Sampling and
  the saved pipeline use diffusers' own attention and all 256 tokens.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from typing import ClassVar

import torch
import torch.nn.functional as F

from alignprop_ray.engine.families.base import Conditioning
from alignprop_ray.engine.families.registry import SD3_SCHEDULE
from alignprop_ray.engine.families.sd3 import T5_TOKENS
from alignprop_ray.engine.families.tiny import clip_tokenizer
from alignprop_ray.toy import shapes
from alignprop_ray.toy.recipes import ToyModels, ToySettings

BYTE_SYMBOLS = 512  # CLIP's vocabulary opens with the 256 byte symbols and their end-of-word forms


def grammar_words() -> list[str]:
    """Every word of the toy-shapes captions."""
    return sorted({word for caption in shapes.all_captions() for word in caption.split()})


def grammar_clip_tokenizer(words: list[str], pad_token: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer (`families.tiny.clip_tokenizer`) restricted to the merges that build `words`.

    BPE applies, at each step, the lowest-ranked merge among the adjacent pairs present. Keeping every
    merge whose result is a piece of one of the words (an end-of-word piece only at a word's end), in
    CLIP's order, keeps every merge CLIP applies to those words at its relative rank, so they tokenize into
    the same pieces; the specials keep their place at the end of the vocabulary.
    """
    from transformers import CLIPTokenizer

    full = clip_tokenizer(pad_token=pad_token)
    model = json.loads(full.backend_tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"], key=model["vocab"].get)
    endings = [word.lower() + "</w>" for word in words]
    merges = [tuple(m) for m in model["merges"] if any("".join(m) in end for end in endings)]
    vocab = by_id[:BYTE_SYMBOLS] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        unk_token="<|endoftext|>",
    )


class RepeatedTokenJointAttention:
    """diffusers' `JointAttnProcessor2_0` (the same projections, norms and output layers) where the last
    context token stands for `repeats` identical tokens: its attention logit is raised by log(repeats).

    softmax over keys (k_1 .. k_n, and `repeats` copies of k) = softmax over (k_1 .. k_n, k) with
    log(repeats) added to k's logit, and every copy's own output equals the one token's output.
    """

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]
        heads = attn.heads

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = (split_heads(p(x), heads) for p in (to_q, to_k, to_v))
            return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        cq, ck, cv = project(
            encoder_hidden_states,
            attn.add_q_proj,
            attn.add_k_proj,
            attn.add_v_proj,
            attn.norm_added_q,
            attn.norm_added_k,
        )
        keys = image_tokens + encoder_hidden_states.shape[1]
        bias = torch.zeros(1, 1, 1, keys, dtype=q.dtype, device=q.device)
        bias[..., -1] = self.log_repeats
        out = F.scaled_dot_product_attention(
            torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), attn_mask=bias
        )
        out = out.transpose(1, 2).reshape(batch, -1, heads * q.shape[-1]).to(q.dtype)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads x dim) -> (batch, heads, tokens, dim)."""
    return x.view(*x.shape[:2], heads, x.shape[-1] // heads).transpose(1, 2)


@dataclass(frozen=True)
class SD3Toy(ToySettings):
    """SD3's shape and loss: x_t = (1 - sigma) x0 + sigma noise, the MMDiT regresses the velocity
    noise - x0; sigma is SD3's logit-normal draw mapped through the scheduler's shift (what diffusers'
    train_dreambooth_sd3.py draws with weighting_scheme=logit_normal)."""

    family: ClassVar[str] = "sd3"
    text_widths: tuple[int, int] = (32, 48)  # CLIP-L, CLIP-G (768, 1280 in SD3)
    layers: int = 6
    heads: int = 4
    head_dim: int = 24
    patch_size: int = 2
    logit_mean: float = 0.0  # SD3 paper's rf/lognorm(0.00, 1.00)
    logit_std: float = 1.0
    # No offset noise (the SD toy needs it, recipes.SDToy.offset_noise): flow sampling starts at sigma = 1,
    # pure noise, where the training inputs carry no trace of the clean latents either. 400-iteration pilots
    # (seed 0, same sizes): without it every background was right (24/24 scene x seed) and 17/24 scenes all
    # right; with 0.3 also 24/24 backgrounds but 13/24 scenes: it only slowed the shape colours down.
    denoiser_iters: int = 3000  # ~1.3 CPU s each (batch 64, one thread): the run's 80 minutes with the VAE

    def tiny(self) -> SD3Toy:
        return replace(super().tiny(), text_widths=(16, 16), layers=1, heads=2, head_dim=8)

    def vae_config(self) -> dict:
        # SD3's VAE: 16 latent channels, no quant convs
        return dict(super().vae_config(), latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

    @property
    def joint_width(self) -> int:
        """T5's width in SD3 (joint_attention_dim): here just the CLIPs' concatenated width."""
        return sum(self.text_widths)

    def networks(self):
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        patches = self.latent_size // self.patch_size
        transformer = SD3Transformer2DModel(
            sample_size=self.latent_size,
            patch_size=self.patch_size,
            in_channels=16,
            out_channels=16,
            num_layers=self.layers,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.heads,
            joint_attention_dim=self.joint_width,
            caption_projection_dim=self.heads * self.head_dim,
            pooled_projection_dim=self.joint_width,
            pos_embed_max_size=2 * patches,  # sampling up to twice the native resolution
            qk_norm="rms_norm",  # SD3.5's
        )
        vocab = len(_tokenizers()[0])
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=width,
                    intermediate_size=4 * width,
                    num_hidden_layers=2,  # SD3 reads the penultimate hidden state
                    num_attention_heads=4,
                    max_position_embeddings=77,
                    vocab_size=vocab,
                    bos_token_id=vocab - 2,
                    eos_token_id=vocab - 1,
                    pad_token_id=vocab - 1,
                    projection_dim=width,
                    hidden_act=act,
                )
            )
            for width, act in zip(self.text_widths, ("quick_gelu", "gelu"), strict=True)
        ]
        return transformer, encoders

    def tokenizers(self):
        return list(_tokenizers())

    def normalize_latents(self, vae, latents):
        # SD3's VAE config holds a shift and a scale (0.0609, 1.5305): latents = (z - shift) * scale
        shift = float(latents.mean())
        vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (latents - shift).std()))
        return (latents - shift) * vae.config.scaling_factor

    def condition(self, models: ToyModels, tokens: list[torch.Tensor], t5_tokens: int = 1) -> Conditioning:
        """StableDiffusion3Pipeline.encode_prompt without T5, with gradient: both CLIPs' penultimate
        states side by side, zero-padded to the joint width, then `t5_tokens` zero tokens (1 in training,
        standing for the pipeline's 256 under `RepeatedTokenJointAttention`); pooled: both projections."""
        hidden, pooled = [], []
        for ids, encoder in zip(tokens, models.text_encoders, strict=True):
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, self.joint_width - clip.shape[-1]))
        t5 = clip.new_zeros(len(clip), t5_tokens, self.joint_width)
        embeds, pooled = torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, guided=False)

    def noise(self, x0, gen):
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(len(x0), generator=gen))
        shift = SD3_SCHEDULE["shift"]
        sigma = shift * u / (1 + (shift - 1) * u)  # FlowMatchEulerDiscreteScheduler's time shift
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, sigma * SD3_SCHEDULE["num_train_timesteps"], noise - x0

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE)

    @contextmanager
    def training(self, denoiser):
        """The MMDiT with T5's 256 zero tokens passed as one (`RepeatedTokenJointAttention`)."""
        default = denoiser.attn_processors
        denoiser.set_attn_processor(RepeatedTokenJointAttention(T5_TOKENS))
        try:
            yield
        finally:
            denoiser.set_attn_processor(default)


@cache
def _tokenizers() -> tuple:
    """CLIP-L's and CLIP-G's tokenizers (G pads with "!", as OpenCLIP bigG), over the grammar's words."""
    words = grammar_words()
    return grammar_clip_tokenizer(words), grammar_clip_tokenizer(words, pad_token="!")
