"""Stand-in for ComfyUI's HunyuanVideo VAE (tests only; ComfyUI builds it as a 3-D ``AutoencoderKL``)."""

import torch


class VideoVAE(torch.nn.Module):
    def __init__(self, diffusers_vae):
        super().__init__()
        self.inner = diffusers_vae

    def decode(self, z):
        return self.inner.decode(z).sample
