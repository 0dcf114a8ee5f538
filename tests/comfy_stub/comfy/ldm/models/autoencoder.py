"""Stand-in for ``comfy.ldm.models.autoencoder`` (tests only): ComfyUI's decoders return plain tensors.

Their ``decoder`` is ComfyUI's LDM ``Decoder`` structure (``comfy.ldm.modules.diffusionmodules.model``) over the
modules of a diffusers VAE (same weights), so a decode here equals the diffusers one.
"""

import torch

from comfy.ldm.modules.diffusionmodules.model import ldm_decoder_from_diffusers


class AutoencodingEngine(torch.nn.Module):
    """``decode(z) = decoder(z)`` (ComfyUI's engine without quant convs, e.g. the Flux VAE)."""

    def __init__(self, diffusers_vae):
        super().__init__()
        self.decoder = ldm_decoder_from_diffusers(diffusers_vae)

    def decode(self, z, **decoder_kwargs):
        return self.decoder(z, **decoder_kwargs)


class AutoencoderKL(AutoencodingEngine):
    """``decode(z) = decoder(post_quant_conv(z))`` (ComfyUI's SD1.x/SDXL VAE)."""

    def __init__(self, diffusers_vae):
        super().__init__(diffusers_vae)
        self.post_quant_conv = diffusers_vae.post_quant_conv

    def decode(self, z, **decoder_kwargs):
        return self.decoder(self.post_quant_conv(z), **decoder_kwargs)
