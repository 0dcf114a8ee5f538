"""Stand-in for ``comfy.utils.tiled_scale`` (tests only): feathered tiles averaged, as ComfyUI blends them."""

import itertools

import torch


@torch.inference_mode()
def tiled_scale_multidim(samples, function, tile=(64, 64), overlap=8, upscale_amount=4, out_channels=3,
                         output_device="cpu"):
    """Decode ``samples`` ``[B, C, *dims]`` tile by tile (step ``tile - overlap``), feather each tile's
    edges linearly over the overlap and divide by the summed weights (ComfyUI's scheme)."""
    dims = len(tile)
    overlaps = (overlap,) * dims if isinstance(overlap, int) else tuple(overlap)
    up = upscale_amount
    out_shape = [round(s * up) for s in samples.shape[2:]]
    output = torch.empty([samples.shape[0], out_channels, *out_shape], device=output_device)
    for b in range(samples.shape[0]):
        s = samples[b:b + 1]
        if all(s.shape[d + 2] <= tile[d] for d in range(dims)):
            output[b:b + 1] = function(s).to(output_device)
            continue
        out = torch.zeros([1, out_channels, *out_shape], device=output_device)
        div = torch.zeros_like(out)
        positions = [range(0, max(1, s.shape[d + 2] - overlaps[d]), max(1, tile[d] - overlaps[d]))
                     if s.shape[d + 2] > tile[d] else [0] for d in range(dims)]
        for it in itertools.product(*positions):
            s_in, starts = s, []
            for d in range(dims):
                pos = max(0, min(s.shape[d + 2] - overlaps[d], it[d]))
                length = min(tile[d], s.shape[d + 2] - pos)
                s_in = s_in.narrow(d + 2, pos, length)
                starts.append(round(pos * up))
            ps = function(s_in).to(output_device)
            mask = torch.ones_like(ps)
            for d in range(dims):
                feather = round(overlaps[d] * up)
                if feather >= mask.shape[d + 2]:
                    continue
                for t in range(feather):
                    a = (t + 1) / feather
                    mask.narrow(d + 2, t, 1).mul_(a)
                    mask.narrow(d + 2, mask.shape[d + 2] - 1 - t, 1).mul_(a)
            o, od = out, div
            for d in range(dims):
                o = o.narrow(d + 2, starts[d], mask.shape[d + 2])
                od = od.narrow(d + 2, starts[d], mask.shape[d + 2])
            o.add_(ps * mask)
            od.add_(mask)
        output[b:b + 1] = out / div
    return output


def tiled_scale(samples, function, tile_x=64, tile_y=64, overlap=8, upscale_amount=4, out_channels=3,
                output_device="cpu"):
    return tiled_scale_multidim(samples, function, (tile_y, tile_x), overlap=overlap, upscale_amount=upscale_amount,
                                out_channels=out_channels, output_device=output_device)
