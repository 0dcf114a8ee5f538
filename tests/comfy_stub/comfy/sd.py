"""Stand-in for ``comfy.sd.VAE`` (tests only; attribute and method names as in ComfyUI, see ../README.md)."""

import math

import torch

from comfy import model_management, model_patcher, utils


class VAE:
    """A ComfyUI-style VAE around a model whose ``decode(z)`` returns a tensor in [-1, 1].

    Args:
        first_stage_model: e.g. ``comfy.ldm.models.autoencoder.AutoencoderKL(diffusers_vae)``.
        latent_channels: channels of the latent.
        video: 3-D latents ``[B, C, T, h, w]`` with 4x causal temporal compression (HunyuanVideo, Wan).
        device / dtype: ``vae.device`` / ``vae.vae_dtype`` (default CPU, float32).
    """

    def __init__(self, first_stage_model, *, latent_channels, video=False, device=None, dtype=None):
        self.memory_used_decode = lambda shape, dtype: (2178 * shape[-2] * shape[-1] * 64) * model_management.dtype_size(dtype)
        self.latent_channels = latent_channels
        self.output_channels = 3
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.extra_1d_channel = None
        self.handles_tiling = False
        if video:
            self.latent_dim = 3
            self.upscale_ratio = (lambda a: max(0, a * 4 - 3), 8, 8)
            self.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), 8, 8)
            self.memory_used_decode = lambda shape, dtype: ((1500 * shape[2] * shape[3] * shape[4] * (4 * 8 * 8))
                                                            * model_management.dtype_size(dtype))
        else:
            self.latent_dim = 2
            self.upscale_ratio = 8
            self.downscale_ratio = 8
        self.first_stage_model = first_stage_model.eval() if first_stage_model is not None else None
        self.device = device or model_management.vae_device()
        self.vae_dtype = dtype or model_management.vae_dtype()
        if self.first_stage_model is not None:
            self.first_stage_model.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                  offload_device=model_management.vae_offload_device())
        self.decode_calls = []  # stub only: what decode/decode_tiled were asked

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError("ERROR: VAE is invalid: None\n\nIf the VAE is from a checkpoint loader node your "
                               "checkpoint does not contain a valid VAE.")

    def spacial_compression_decode(self):
        try:
            return self.upscale_ratio[-1]
        except TypeError:
            return self.upscale_ratio

    def temporal_compression_decode(self):
        try:
            return round(self.upscale_ratio[0](8192) / 8192)
        except TypeError:
            return None

    def _decode_fn(self, a):
        out = self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device))
        return getattr(out, "sample", out).float()

    def decode(self, samples_in, vae_options={}):  # noqa: B006 (ComfyUI's signature)
        self.throw_exception_if_invalid()
        self.decode_calls.append(("decode", tuple(samples_in.shape)))
        if self.latent_dim == 2 and samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        with torch.inference_mode():
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used)
            out = self._decode_fn(samples_in).to(self.output_device)
            pixel_samples = self.process_output(out)
        return pixel_samples.movedim(1, -1)

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        sc = self.spacial_compression_decode()
        passes = [utils.tiled_scale(samples, self._decode_fn, tx, ty, overlap, upscale_amount=sc,
                                    out_channels=self.output_channels, output_device=self.output_device)
                  for tx, ty in ((tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2), (tile_x, tile_y))]
        return self.process_output(sum(passes) / 3.0)

    def decode_tiled_3d(self, samples, tile_t=999, tile_x=32, tile_y=32, overlap=(1, 8, 8)):
        # spatial tiles over whole frames (ComfyUI also tiles time; the stub records tile_t only)
        sc = self.spacial_compression_decode()
        b, c, t, h, w = samples.shape
        frames = self.upscale_ratio[0](t)
        flat = lambda a: self._decode_fn(a.reshape(1, c, t, a.shape[-2], a.shape[-1]))  # noqa: E731
        out = torch.empty(b, self.output_channels, frames, h * sc, w * sc)
        for i in range(b):
            def fn(a, i=i):
                y = flat(a)  # [1, 3, F, H, W]
                return y.reshape(1, -1, y.shape[-2], y.shape[-1])
            tiles = utils.tiled_scale(samples[i:i + 1].reshape(1, c * t, h, w), fn, tile_x, tile_y, overlap[-1],
                                      upscale_amount=sc, out_channels=self.output_channels * frames,
                                      output_device=self.output_device)
            out[i] = tiles.reshape(self.output_channels, frames, h * sc, w * sc)
        return self.process_output(out)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.throw_exception_if_invalid()
        self.decode_calls.append(("decode_tiled", {"tile_x": tile_x, "tile_y": tile_y, "overlap": overlap,
                                                   "tile_t": tile_t, "overlap_t": overlap_t}))
        dims = samples.ndim - 2
        args = {k: v for k, v in (("tile_x", tile_x), ("tile_y", tile_y), ("overlap", overlap)) if v is not None}
        model_management.load_models_gpu([self.patcher], memory_required=1)
        with torch.inference_mode():
            if dims == 2:
                output = self.decode_tiled_(samples, **args)
            else:
                args["overlap"] = (1 if overlap_t is None else max(1, overlap_t), overlap or 8, overlap or 8)
                if tile_t is not None:
                    args["tile_t"] = max(2, tile_t)
                output = self.decode_tiled_3d(samples, **args)
        return output.movedim(1, -1)
