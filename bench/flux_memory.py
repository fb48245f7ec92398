"""Memory ESTIMATE for FLUX.1 [dev] training (docs/model_families.md): no GPU, no weights, no compute.

    python bench/flux_memory.py [--resolution 1024 768 512] [--batch 1]

Builds the real FLUX.1 [dev] transformer (19 double-stream + 38 single-stream blocks, 11.9 B parameters)
and T5-XXL, CLIP-L and the 16-channel VAE on PyTorch's `meta` device (shapes only), attaches the family's
default LoRA (rank 4), runs one transformer call with autograd at each resolution (one image per call: no
classifier-free guidance batch) and adds up the distinct storages autograd saves for backward, frozen
weights excluded. Attention is counted as flash / memory-efficient SDPA keeps it on a GPU (q, k, v, the
output and the row log-sum-exp), not as an N x N matrix. Prints the weights and the saved bytes per call;
docs/model_families.md turns them into a peak per GPU.
"""

from __future__ import annotations

import argparse

import torch

GIB = 2**30
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5_TOKENS = 512


class FlashLikeAttention(torch.autograd.Function):
    """What a flash / memory-efficient SDPA kernel saves for backward: q, k, v, output, row log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[:-1], device=query.device, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, *_ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def flash_like_sdpa(query, key, value, *args, **kwargs):
    return FlashLikeAttention.apply(query, key, value)


def transformer_with_lora():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from alignprop_ray.engine.families.registry import family_row

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(family_row("flux").lora_targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as attach_lora keeps LoRA in fp32
    return model


def saved_bytes(model, resolution: int, batch: int) -> int:
    """Bytes autograd keeps for backward from one call on `batch` images at `resolution` px."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    side = resolution // 8 // 2  # the 8x VAE, then 2 x 2 packing
    meta, bf16 = {"device": "meta", "dtype": torch.bfloat16}, torch.bfloat16
    inputs = dict(
        hidden_states=torch.empty(batch, side * side, 64, **meta),
        encoder_hidden_states=torch.empty(batch, T5_TOKENS, 4096, **meta),
        pooled_projections=torch.empty(batch, 768, **meta),
        timestep=torch.empty(batch, **meta),
        guidance=torch.empty(batch, device="meta", dtype=torch.float32),
        img_ids=torch.empty(side * side, 3, device="meta", dtype=bf16),
        txt_ids=torch.empty(T5_TOKENS, 3, device="meta", dtype=bf16),
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**inputs, return_dict=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return sum(saved.values())


def frozen_weights() -> dict[str, int]:
    """Parameter counts of the text encoders and VAE of FLUX.1 (T5-XXL, CLIP-L, the 16-channel VAE)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
        vae = AutoencoderKL(
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("T5-XXL", t5), ("CLIP-L", clip), ("VAE", vae))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024, 768, 512])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    model = transformer_with_lora()
    params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"transformer: {params / 1e9:.2f} B parameters, {params * 2 / GIB:.1f} GiB in bf16")
    for name, count in frozen_weights().items():
        print(f"{name}: {count / 1e9:.3f} B parameters, {count * 2 / GIB:.2f} GiB in bf16")
    print(f"LoRA rank 4: {lora / 1e6:.1f} M parameters, {lora * 16 / GIB:.2f} GiB with grads and AdamW state")
    for resolution in args.resolution:
        saved = saved_bytes(model, resolution, args.batch)
        print(f"{resolution} px, batch {args.batch}: one transformer call saves {saved / GIB:.1f} GiB")


if __name__ == "__main__":
    main()
