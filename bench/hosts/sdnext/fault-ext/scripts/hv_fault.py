"""Test-only SD.Next extension (bench/hosts/sdnext): makes every VAE decode run out of memory while the file
``<SD.Next data folder>/hv-fault-oom`` exists, so the real host shows what hybrid-vae does when every plan fails.

A forward pre-hook on the loaded model's ``vae.decoder`` raises a real ``torch.OutOfMemoryError`` (the GPU plans
and the CPU plan all run that decoder). Installed next to hybrid-vae by check.py; never part of the product.
"""

import os

from modules import script_callbacks, shared


def _flag() -> str:
    return os.path.join(str(getattr(shared.cmd_opts, "data_dir", None) or "."), "hv-fault-oom")


def _hook(module, args):
    import torch

    if os.path.exists(_flag()):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by hv_fault.py)")


def _arm(p):
    model = shared.sd_model  # a generation is starting: the model is loaded anyway
    vae = getattr(model, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if decoder is not None and not getattr(decoder, "_hv_fault", False):
        decoder.register_forward_pre_hook(_hook)
        decoder._hv_fault = True


script_callbacks.on_before_process(_arm)
