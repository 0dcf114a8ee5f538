"""Stand-in for ``comfy.ldm.wan.vae`` (tests only)."""

import torch


class WanVAE(torch.nn.Module):
    def __init__(self, diffusers_vae):
        super().__init__()
        self.inner = diffusers_vae

    def decode(self, z):
        return self.inner.decode(z).sample
