"""Write a random-weight SD1.5-config VAE (diffusers AutoencoderKL) as a diffusers folder.

usage: python mkvae.py SEED OUT_DIR   (needs torch, diffusers, safetensors)
OUT_DIR/diffusion_pytorch_model.safetensors is also what ComfyUI's VAELoader reads from models/vae/ (it detects
an SD1.x VAE and converts the diffusers key names on load); OUT_DIR as a whole is what `hybrid-vae serve
--family sd15=OUT_DIR` loads. Two seeds give two VAEs of the same architecture with different weights.
"""
import os
import sys

import torch
from diffusers import AutoencoderKL

seed, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(seed)
vae = AutoencoderKL(in_channels=3, out_channels=3,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
vae.save_pretrained(out + ".part", safe_serialization=True)
os.replace(out + ".part", out) if not os.path.exists(out) else None
print(out, sum(p.numel() for p in vae.parameters()), "params, seed", seed)
