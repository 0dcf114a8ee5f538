"""Stand-in for ``comfy.ldm.modules.diffusionmodules.model`` (tests only): the LDM ``Decoder`` with ComfyUI's
module names and forward (``conv_in``, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``up[i].block[j]``
``ResnetBlock`` with ``nin_shortcut``, ``up[i].attn``, ``up[i].upsample``, ``norm_out``, ``conv_out``; ``up[0]`` is
the highest resolution and runs last).

:func:`ldm_decoder_from_diffusers` builds one that *shares* a diffusers ``Decoder``'s convolution and
normalisation modules (no copy), so both decode the same latent to the same image (up to the attention
kernel's rounding). ComfyUI builds its own modules from a state dict instead; the structure is what matters.
"""

import torch


class ResnetBlock(torch.nn.Module):
    def __init__(self, d):  # d: diffusers ResnetBlock2D
        super().__init__()
        self.in_channels, self.out_channels = d.conv1.in_channels, d.conv1.out_channels
        self.use_conv_shortcut = False
        self.swish = torch.nn.SiLU(inplace=True)
        self.norm1, self.conv1, self.norm2, self.conv2 = d.norm1, d.conv1, d.norm2, d.conv2
        self.dropout = torch.nn.Dropout(0.0, inplace=True)
        if self.in_channels != self.out_channels:
            self.nin_shortcut = d.conv_shortcut  # diffusers' 1x1 conv_shortcut is LDM's nin_shortcut

    def forward(self, x, temb=None, conv_carry_in=None, conv_carry_out=None):
        h = self.conv1(self.swish(self.norm1(x)))
        h = self.conv2(self.dropout(self.swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(torch.nn.Module):
    """Single-head self-attention over pixels (LDM's q/k/v/proj_out are 1x1 convolutions; diffusers' are Linear
    layers with the same weights)."""

    def __init__(self, a):  # a: diffusers Attention
        super().__init__()
        self.norm, self.q, self.k, self.v, self.proj_out = a.group_norm, a.to_q, a.to_k, a.to_v, a.to_out[0]

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).view(b, c, h * w).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(self.q(t)[:, None], self.k(t)[:, None], self.v(t)[:, None])
        return x + self.proj_out(o[:, 0]).transpose(1, 2).reshape(b, c, h, w)


class Upsample(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.with_conv, self.scale_factor, self.conv = True, 2.0, conv

    def forward(self, x, conv_carry_in=None, conv_carry_out=None):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


class Decoder(torch.nn.Module):
    def __init__(self, d):  # d: diffusers Decoder
        super().__init__()
        self.carried, self.tanh_out = False, False
        self.conv_in = d.conv_in
        self.mid = torch.nn.Module()
        self.mid.block_1 = ResnetBlock(d.mid_block.resnets[0])
        self.mid.attn_1 = AttnBlock(d.mid_block.attentions[0])
        self.mid.block_2 = ResnetBlock(d.mid_block.resnets[1])
        self.up = torch.nn.ModuleList()
        for blk in reversed(d.up_blocks):  # LDM order: up[0] is the highest resolution
            level = torch.nn.Module()
            level.block = torch.nn.ModuleList(ResnetBlock(r) for r in blk.resnets)
            level.attn = torch.nn.ModuleList()
            if blk.upsamplers:
                level.upsample = Upsample(blk.upsamplers[0].conv)
            self.up.append(level)
        self.norm_out, self.conv_out = d.conv_norm_out, d.conv_out

    def forward(self, z, **kwargs):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(len(self.up))):
            for blk in self.up[i_level].block:
                h = blk(h)
            if hasattr(self.up[i_level], "upsample"):
                h = self.up[i_level].upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def ldm_decoder_from_diffusers(diffusers_vae):
    """ComfyUI's decoder structure over a diffusers AutoencoderKL's decoder modules (shared, not copied)."""
    return Decoder(diffusers_vae.decoder)
