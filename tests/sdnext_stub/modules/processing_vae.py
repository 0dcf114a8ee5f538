"""SD.Next's ``modules.processing_vae``: ``vae_decode``, ``full_vae_decode``, ``vae_postprocess``.

Behaviour reproduced (shared/notes/sdnext.md):

* ``vae_decode(latents, model, output_type='np', vae_type='Full', width=None, height=None, frames=None)``:
  non-tensors pass through; an empty batch or an interrupted/skipped job returns ``[]``; ``Remote``
  tries the remote decoder first and falls through to local when it returns nothing; packed (Flux)
  latents are unpacked with ``model._unpack_latents`` when width/height are given; a 3-D latent gets
  its batch dimension back; ``Tiny`` uses TAESD; the tensor goes through ``vae_postprocess``.
* ``full_vae_decode(latents, model)``: VAE to the device, upcast when ``force_upcast``/``no_half_vae``,
  normalisation (``latents_mean/std`` when present, else ``/ scaling_factor``, then ``+ shift_factor``),
  ``vae.decode(z, return_dict=False)[0]``; ON ANY EXCEPTION (out of memory included) it logs and
  returns ``[]``: the image is lost.
* ``vae_postprocess(tensor, model, output_type)``: video pipelines -> PIL frames (flattened), image
  pipelines -> ``model.image_processor.postprocess`` (``np`` float array / ``pil`` list); non-tensors
  are returned as a list.

``remote_calls`` and ``taesd_calls`` count what the stub's Remote/Tiny paths were asked (tests).
"""

import numpy as np
import torch

from modules import devices, errors, shared

remote_calls = []
taesd_calls = []


def remote_decode(latents, width=None, height=None):
    """SD.Next's own remote decode; no network here: nothing comes back (SD.Next then decodes locally)."""
    remote_calls.append(tuple(latents.shape))
    return None


def taesd_vae_decode(latents):
    """TAESD stand-in: a cheap approximate decode in [0, 1] (8x nearest upsampling of 3 latent channels)."""
    taesd_calls.append(tuple(latents.shape))
    x = torch.nn.functional.interpolate(latents[:, :3].float(), scale_factor=8, mode="nearest")
    return torch.sigmoid(x)


def full_vae_decode(latents, model):
    if not hasattr(model, "vae") and hasattr(model, "pipe"):
        model = model.pipe
    if model is None or not hasattr(model, "vae"):
        shared.log.error("VAE not found in model")
        return []
    vae = model.vae
    vae.to(devices.device)
    orig_dtype = vae.dtype
    upcast = vae.dtype == torch.float16 and (getattr(vae.config, "force_upcast", False) or shared.opts.no_half_vae)
    if upcast:
        vae.to(dtype=torch.float32)
    latents = latents.to(devices.device)
    cfg = vae.config
    mean, std = cfg.get("latents_mean", None), cfg.get("latents_std", None)
    scaling, shift = cfg.get("scaling_factor", 1.0) or 1.0, cfg.get("shift_factor", None)
    if mean and std:
        view = [1] * latents.ndim
        view[1] = -1
        mean = torch.tensor(mean).view(*view).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(*view).to(latents.device, latents.dtype)
        latents = latents * std / scaling + mean
    else:
        latents = latents / scaling
    if shift:
        latents = latents + shift
    if type(vae).__name__ == "AutoencoderKLWan" and latents.ndim == 4:
        latents = latents.unsqueeze(2)
    latents = latents.to(vae.dtype)
    try:
        with torch.no_grad():
            decoded = vae.decode(latents, return_dict=False)[0]
    except Exception as e:
        shared.log.error(f"VAE decode: {e}")
        if "out of memory" not in str(e):
            errors.display(e, "VAE decode")
        decoded = []
    if upcast:
        vae.to(dtype=orig_dtype)
    return decoded


def vae_postprocess(tensor, model, output_type="np"):
    images = []
    try:
        if isinstance(tensor, list) and len(tensor) > 0 and torch.is_tensor(tensor[0]):
            tensor = torch.stack(tensor)
        if torch.is_tensor(tensor):
            if tensor.ndim == 3 and tensor.shape[0] == 3:
                tensor = tensor.unsqueeze(0)
            if hasattr(model, "video_processor"):
                if tensor.ndim == 4 and tensor.shape[1] == 3:
                    tensor = tensor.unsqueeze(2)
                images = model.video_processor.postprocess_video(tensor, output_type="pil")
                if isinstance(images, list) and images and isinstance(images[0], list):
                    images = [frame for batch in images for frame in batch]
            else:
                if not hasattr(model, "image_processor"):
                    from diffusers.image_processor import VaeImageProcessor

                    model.image_processor = VaeImageProcessor()
                if tensor.ndim == 5 and tensor.shape[1] == 3:
                    tensor = tensor[:, :, 0]
                images = model.image_processor.postprocess(tensor, output_type=output_type)
        else:
            images = tensor if isinstance(tensor, (list, np.ndarray)) else [tensor]
    except Exception as e:
        shared.log.error(f"VAE postprocess: {e}")
        errors.display(e, "VAE")
    return images


def vae_decode(latents, model, output_type="np", vae_type="Full", width=None, height=None, frames=None):
    model = model or shared.sd_model
    if not hasattr(model, "vae") and hasattr(model, "pipe"):
        model = model.pipe
    if latents is None or not torch.is_tensor(latents):
        return latents
    if latents.shape[0] == 0:
        shared.log.error(f"VAE nothing to decode: {latents.shape}")
        return []
    if shared.state.interrupted or shared.state.skipped:
        return []
    if not hasattr(model, "vae"):
        shared.log.error("VAE not found in model")
        return []
    if vae_type == "Remote":
        jobid = shared.state.begin("Remote VAE")
        tensors = remote_decode(latents=latents, width=width, height=height)
        shared.state.end(jobid)
        if tensors is not None and len(tensors) > 0:
            return vae_postprocess(tensors, model, output_type)
    jobid = shared.state.begin("VAE Decode")
    if hasattr(model, "_unpack_latents") and hasattr(model, "vae_scale_factor") and width is not None \
            and height is not None and latents.ndim == 3:
        latents = model._unpack_latents(latents, height, width, model.vae_scale_factor)
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.shape[-1] <= 4:
        decoded = latents.float().cpu().numpy()
    elif vae_type == "Tiny":
        decoded = taesd_vae_decode(latents=latents)
        if torch.is_tensor(decoded):
            decoded = 2.0 * decoded - 1.0
    else:
        decoded = full_vae_decode(latents=latents, model=model)
    images = vae_postprocess(decoded, model, output_type)
    devices.torch_gc()
    shared.state.end(jobid)
    return images
