"""Helpers for tests that run hybrid-vae inside the SD.Next stand-in (``tests/sdnext_stub``)."""

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

STUB_DIR = Path(__file__).resolve().parent
REPO_DIR = STUB_DIR.parent.parent
STUB_NAMES = ("modules", "gradio", "launch")


_ROOT_STATE = []  # the root logger's (level, handlers) before the first stand-in changed them


def purge():
    """Forget every stub module (the next import gives a fresh SD.Next) and undo what it did to logging:
    the root logger's level and handlers, SD.Next's handlers, and the forwarding of the ``hybrid_vae`` logger."""
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_NAMES:
            del sys.modules[name]
    sd = logging.getLogger("sd")
    for h in list(sd.handlers):
        sd.removeHandler(h)
        h.close()
    ours = logging.getLogger("hybrid_vae")
    for h in list(ours.handlers):
        if type(h).__name__ == "ForwardToSDNext":
            ours.removeHandler(h)
    ours.propagate = True
    ours.setLevel(logging.NOTSET)
    if _ROOT_STATE:
        level, handlers = _ROOT_STATE[0]
        root = logging.getLogger()
        root.setLevel(level)
        root.handlers[:] = handlers


def fresh_sdnext(data_dir):
    """A fresh SD.Next stand-in whose data folder is ``data_dir`` (sets env SD_STUB_DATA_DIR)."""
    purge()
    if not _ROOT_STATE:
        root = logging.getLogger()
        _ROOT_STATE.append((root.level, list(root.handlers)))
    os.environ["SD_STUB_DATA_DIR"] = str(data_dir)
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))
    from modules import processing, processing_vae, script_callbacks, scripts_manager, sd_hijack_vae, shared

    return SimpleNamespace(shared=shared, processing=processing, processing_vae=processing_vae,
                           script_callbacks=script_callbacks, scripts_manager=scripts_manager,
                           sd_hijack_vae=sd_hijack_vae, original_vae_decode=processing_vae.vae_decode)


def load_extension(ext_dir=REPO_DIR):
    """Execute the extension's ``scripts/*.py`` as SD.Next does; returns the registered Script classes."""
    from modules import scripts_manager

    return scripts_manager.load_scripts([str(ext_dir)])


def unpack(latents, height, width, vae_scale_factor):
    """Flux packed ``[B, (H/16)*(W/16), C*4]`` -> ``[B, C, H/8, W/8]`` (the layout of diffusers' FluxPipeline)."""
    b, _n, c = latents.shape
    h = 2 * (int(height) // (vae_scale_factor * 2))
    w = 2 * (int(width) // (vae_scale_factor * 2))
    z = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c // 4, h, w)


class ImagePipeline:
    """What SD.Next hands to ``vae_decode`` as ``model``: a diffusers-like image pipeline."""

    def __init__(self, vae, *, name="stub/checkpoint", packed=False):
        from diffusers.image_processor import VaeImageProcessor

        self.vae = vae
        self.vae_scale_factor = 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=8)
        self.config = {"_name_or_path": name}
        if packed:
            self._unpack_latents = unpack


class VideoPipeline:
    """A diffusers-like HunyuanVideo/Wan pipeline: ``decode`` does what their ``__call__`` does after denoising."""

    def __init__(self, vae, *, name="stub/video"):
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.vae_scale_factor = 8
        self.video_processor = VideoProcessor(vae_scale_factor=8)
        self.config = {"_name_or_path": name}

    def decode(self, latents, output_type="pt"):
        vae = self.vae
        if type(vae).__name__ == "AutoencoderKLWan":
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            z = latents.to(vae.dtype) / inv_std + mean
        else:
            z = latents.to(vae.dtype) / vae.config.scaling_factor
        with torch.no_grad():
            video = vae.decode(z, return_dict=False)[0]
        return video if output_type == "pt" else self.video_processor.postprocess_video(video, output_type=output_type)
