"""Stand-in for ``comfy.taesd.taesd.TAESD`` (tests only): an image VAE that is not ``decoder(post_quant_conv(z))``."""

import torch


class TAESD(torch.nn.Module):
    def __init__(self, diffusers_vae):
        super().__init__()
        self.inner = diffusers_vae

    def decode(self, z):
        return self.inner.decode(z).sample
