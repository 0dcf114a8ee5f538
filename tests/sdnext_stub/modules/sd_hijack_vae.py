"""SD.Next's ``modules.sd_hijack_vae``: the pipeline VAE's ``decode`` wrapped for video pipelines.

``init_hijack(pipe)`` keeps the original as ``pipe.vae.orig_decode`` (only once) and installs
``hijack_vae_decode``, which moves the VAE to the device, casts the latents to the VAE's dtype, calls
``orig_decode`` and on ANY exception logs and returns ``None``.
"""

import torch

from modules import devices, errors, shared


def hijack_vae_decode(*args, **kwargs):
    jobid = shared.state.begin("VAE Decode")
    vae = shared.sd_model.vae
    try:
        vae.to(devices.device)
        if torch.is_tensor(args[0]):
            latents = args[0].to(device=devices.device, dtype=vae.dtype)
            res = vae.orig_decode(latents, *args[1:], **kwargs)
        else:
            res = vae.orig_decode(*args, **kwargs)
    except Exception as e:
        shared.log.error(f"Decode: vae={vae.__class__.__name__} {e}")
        errors.display(e, "vae")
        res = None
    shared.state.end(jobid)
    return res


def init_hijack(pipe):
    if pipe is not None and hasattr(pipe, "vae") and hasattr(pipe.vae, "decode") and not hasattr(pipe.vae, "orig_decode"):
        pipe.vae.orig_decode = pipe.vae.decode
        pipe.vae.decode = hijack_vae_decode
