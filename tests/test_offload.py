"""Offloaded exact tiling (extension/stream.py with a device budget): the whole-image buffers live in host
memory, the output still equals the full decode, the device working set does not grow with the image, and
the executor's own counts agree with the schedule the estimates cost (policy/passes.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL
from hybrid_vae.extension.fixture import load_fixture_vae
from hybrid_vae.extension.stream import Ledger, diffusers_steps, step_layers, stream_decode
from hybrid_vae.policy import passes as P


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiles are small tensors: on a shared 2-core machine OpenMP's thread hand-offs cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kl(block_out_channels, layers_per_block=2, groups=4, seed=0, **kw):
    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                         norm_num_groups=groups, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, **kw).eval()


def full(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two decodes as images in [0, 1] (peak 1)."""
    x, y = ((t.double().clamp(-1, 1) + 1) / 2 for t in (a, b))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def budget_for(vae, z, tile_px, share):
    """A device budget holding ``share`` of the in-memory buffers' peak (0: everything in host memory)."""
    sched = P.schedule(step_layers(diffusers_steps(vae), z.shape[1]), narrow_in_place=False)
    lh, lw = z.shape[-2:]
    return int(share * P.costs(sched, lh, lw, tile_px, 4, z.shape[0]).buffer_bytes)


@pytest.fixture(scope="module")
def sd_vae():
    """The SD 1.x/2.x/SDXL decoder configuration (128, 256, 512, 512; 2 layers; 32 groups), random weights."""
    return kl([128, 256, 512, 512], groups=32)


@pytest.mark.parametrize(("shape", "tile_px", "share"), [
    ((1, 4, 12, 16), 32, 0.0),   # non-square, everything in host memory
    ((2, 4, 10, 8), 48, 0.3),    # batch 2, part of the buffers on the device
    ((1, 4, 16, 16), 64, 0.0),
])
def test_sd_decoder_offloaded_equals_the_full_decode(sd_vae, shape, tile_px, share):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    ref = full(sd_vae, z)
    with torch.no_grad():
        out = stream_decode(sd_vae, z, tile_px=tile_px, device_budget=budget_for(sd_vae, z, tile_px, share))
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 100


@pytest.mark.parametrize(("shape", "tile_px", "share"), [
    ((1, 4, 24, 40), 64, 0.0), ((2, 4, 32, 24), 96, 0.0), ((1, 4, 32, 32), 40, 0.5), ((2, 4, 17, 23), 128, 0.2),
])
def test_fixture_offloaded_equals_the_full_decode(shape, tile_px, share):
    vae = load_fixture_vae()
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    ref = full(vae, z)
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=tile_px, device_budget=budget_for(vae, z, tile_px, share))
    assert out.shape == ref.shape
    assert psnr(out, ref) >= 100


@pytest.mark.parametrize(("shape", "tile_px", "share"), [((2, 4, 17, 23), 48, 0.0), ((1, 4, 12, 16), 1024, 0.3)])
def test_copies_that_land_late_as_on_cuda_still_equal_the_full_decode(monkeypatch, lagging_mover, shape, tile_px,
                                                                       share):
    """Host buffers through a mover ordered as the CUDA one (reads requested a tile ahead, writes landing a tile
    late, every write in place at the end of a pass): still the full decode. A pass that ends one write short is
    caught (one tile per pass: the next pass reads first the tile still pending)."""
    from hybrid_vae.extension import stream

    vae = load_fixture_vae()
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    ref = full(vae, z)
    lagging = lagging_mover()
    monkeypatch.setattr(stream, "Mover", lagging)
    budget = budget_for(vae, z, tile_px, share)
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=tile_px, device_budget=budget)
    assert psnr(out, ref) >= 100
    assert len(lagging.made) == 1 and lagging.made[0].late > 0 and lagging.made[0].h2d > 0
    if tile_px >= 1024:
        monkeypatch.setattr(stream, "Mover", lagging_mover(lazy_drain=True))
        with torch.no_grad():
            bad = stream_decode(vae, z, tile_px=tile_px, device_budget=budget)
        assert not bool(((bad.double() - ref.double()).abs() <= 1e-3).all())  # stale (or never written): differs


def test_offloaded_is_as_close_to_float64_as_the_full_float32_decode():
    """Where the two float32 results differ (about 2e-4 at most on the fixture), the full decode is the one
    further from a float64 decode: whole-image statistics summed per tile and merged in float64 lose less than
    one float32 reduction over the image."""
    z = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(5))
    ref = full(load_fixture_vae(), z).double()
    ref64 = full(load_fixture_vae(dtype=torch.float64), z.double())
    with torch.no_grad():
        out = stream_decode(load_fixture_vae(), z, tile_px=96, device_budget=0).double()
    assert float((out - ref64).abs().max()) <= float((ref - ref64).abs().max())


def _offloaded_run(vae, side, tile_px, budget):
    z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(7))
    ledger = Ledger("cpu")
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=tile_px, device_budget=budget, ledger=ledger)
    return ledger, out


def test_device_working_set_does_not_grow_with_the_image():
    """Everything in host memory: the bytes of tensors on the compute device (counted by the decode's
    own ledger) are the same at 512^2 and 2048^2 for a 128 px tile; in-memory exact tiling at the same
    tile grows with the image, so the ledger can tell the two apart."""
    vae = kl([8, 16, 32, 32], layers_per_block=1, groups=4)
    small, out_s = _offloaded_run(vae, 512, 128, 0)
    large, out_l = _offloaded_run(vae, 2048, 128, 0)
    assert out_s.device.type == out_l.device.type == "cpu"
    assert small.peak == large.peak > 0
    in_memory, _ = _offloaded_run(vae, 512, 128, None)
    assert in_memory.peak > 4 * small.peak
    assert in_memory.h2d == in_memory.d2h == 0 < small.h2d < large.h2d


@pytest.mark.parametrize("share", [0.0, 0.4])
def test_counted_copies_are_what_the_schedule_says(share):
    """The bytes the store copied each way equal policy.passes.costs for the same placement, and the
    device holds no more whole-image bytes than the budget."""
    vae = kl([8, 16, 32, 32], groups=4)
    z = torch.randn(2, 4, 20, 28)
    budget = budget_for(vae, z, 48, share)
    sched = P.schedule(step_layers(diffusers_steps(vae), 4), narrow_in_place=False)
    c = P.costs(sched, 20, 28, 48, 4, 2, budget)
    assert c.device_bytes <= budget and c.host_bytes > 0
    seen: list[int] = []
    ledger = Ledger("cpu")
    with torch.no_grad():
        out = stream_decode(vae, z, tile_px=48, device_budget=budget, ledger=ledger, on_buffers=seen.append)
    assert (ledger.h2d, ledger.d2h) == (c.h2d_bytes, c.d2h_bytes)
    assert max(seen) == c.buffer_bytes
    zero, _ = _offloaded_run(vae, 224, 48, 0)
    assert ledger.peak <= c.device_bytes + 1.05 * zero.peak
    assert psnr(out, full(vae, z)) >= 100


def test_placement_keeps_the_busiest_buffers_on_the_device():
    sched = P.schedule(P.decoder_layers([128, 256, 512, 512], 2), narrow_in_place=False)
    everything = P.costs(sched, 256, 256, 256, 2, 1, 0)
    assert everything.device_bytes == 0 and everything.host_bytes == everything.buffer_bytes
    none = P.costs(sched, 256, 256, 256, 2, 1, None)
    assert none.host_bytes == none.h2d_bytes == 0
    moved = [P.costs(sched, 256, 256, 256, 2, 1, int(g * 2**30)).moved_bytes for g in (0, 0.5, 1, 2, 3, 4.1)]
    assert moved == sorted(moved, reverse=True) and moved[-1] == 0  # more room, fewer bytes moved
    # at 2 GiB the wide upsampled activation is in host memory and moves ~6 GiB (vs ~39 GiB with none on the device)
    two = P.costs(sched, 256, 256, 256, 2, 1, 2 * 2**30)
    assert two.moved_bytes < 0.2 * everything.moved_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_on_cuda_offloaded_equals_the_full_decode_under_a_bounded_peak(dtype):
    """The copy stream and the pinned staging (extension.stream_store.CudaMover): the same image as the full
    decode, a CUDA peak far below in-memory exact tiling's, and every tile's copy counted."""
    vae = kl([32, 64, 128, 128], groups=8).to("cuda", dtype)
    z = torch.randn(1, 4, 96, 80, device="cuda", dtype=dtype)
    ref = full(vae, z)

    def peak(budget):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            out = stream_decode(vae, z, tile_px=128, device_budget=budget)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    out, offloaded = peak(0)
    _, in_memory = peak(None)
    assert out.device.type == "cpu" and out.shape == ref.shape
    limit = 100 if dtype == torch.float32 else 40  # half types: within their own rounding of the full decode
    assert psnr(out.float(), ref.float().cpu()) >= limit
    assert offloaded < 0.5 * in_memory


class _LdmLike(torch.nn.Module):
    """A decoder written like ComfyUI's LDM one (1x1-convolution attention projections, nin_shortcut), with
    its own plain forward: the reference the step interface must reproduce."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        gn = lambda c: torch.nn.GroupNorm(4, c, eps=1e-6)  # noqa: E731
        conv = lambda a, b, k=3: torch.nn.Conv2d(a, b, k, padding=k // 2)  # noqa: E731
        self.conv_in = conv(4, 16)
        self.r1 = torch.nn.ModuleDict(dict(norm1=gn(16), conv1=conv(16, 16), norm2=gn(16), conv2=conv(16, 16)))
        self.attn = torch.nn.ModuleDict(dict(norm=gn(16), q=conv(16, 16, 1), k=conv(16, 16, 1), v=conv(16, 16, 1),
                                             proj_out=conv(16, 16, 1)))
        self.up = conv(16, 16)
        self.r2 = torch.nn.ModuleDict(dict(norm1=gn(16), conv1=conv(16, 8), norm2=gn(8), conv2=conv(8, 8),
                                           nin_shortcut=conv(16, 8, 1)))
        self.norm_out, self.conv_out = gn(8), conv(8, 3)

    @staticmethod
    def _res(r, x):
        h = r["conv1"](torch.nn.functional.silu(r["norm1"](x)))
        h = r["conv2"](torch.nn.functional.silu(r["norm2"](h)))
        return (r["nin_shortcut"](x) if "nin_shortcut" in r else x) + h

    def forward(self, z):
        x = self._res(self.r1, self.conv_in(z))
        a = self.attn
        n = a["norm"](x)
        b, c, h, w = n.shape
        q, k, v = (a[m](n).reshape(b, c, h * w).transpose(1, 2) for m in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(1, 2) * c ** -0.5, dim=-1) @ v
        x = x + a["proj_out"](att.transpose(1, 2).reshape(b, c, h, w))
        x = self.up(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self._res(self.r2, x)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(x)))

    def stream_steps(self):
        from hybrid_vae.extension.stream import Attention, ConvIn, Output, Resnet, Upsample

        a = self.attn
        return [ConvIn(self.conv_in),
                Resnet(self.r1["norm1"], self.r1["conv1"], self.r1["norm2"], self.r1["conv2"]),
                Attention(a["norm"], a["q"], a["k"], a["v"], a["proj_out"]),
                Upsample(self.up),
                Resnet(self.r2["norm1"], self.r2["conv1"], self.r2["norm2"], self.r2["conv2"], self.r2["nin_shortcut"]),
                Output(self.norm_out, self.conv_out)]


@pytest.mark.parametrize("budget", [None, 0])
def test_another_libraries_decoder_through_its_steps(budget):
    """The step interface (what an adapter for ComfyUI's LDM decoder provides through ``stream_steps()``):
    1x1-convolution attention projections and a 1x1 shortcut, in memory and offloaded, equal the plain forward."""
    from hybrid_vae.extension.stream import stream_support

    dec = _LdmLike().eval()
    z = torch.randn(2, 4, 20, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = dec(z)
        out = stream_decode(dec, z, tile_px=16, device_budget=budget)
    assert stream_support(dec) is None
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-4


def test_the_engine_runs_an_offloaded_plan_end_to_end():
    """HybridDecoder on a simulated card whose free memory holds exact tiles only with host memory: the plan
    runs through the executor, the image equals the full decode, the infotext names it; with host memory
    too small the engine says why it drifts instead."""
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy import load_profiles, parse_simulation

    vae = load_fixture_vae()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.8
    ref = full(vae, to_vae_space(z, load_profiles("").family("sd15"))).clamp(-1, 1)
    sim = "name=NVIDIA GeForce RTX 3070,free_gib=0.6,host_gib={}"
    r = HybridDecoder(probe=lambda: parse_simulation(sim.format(8))).decode(z, vae, family="sd15")
    assert r.report.ran.offloaded and "exact+host" in r.report.ran.label
    assert "exact+host" in r.report.infotext() and psnr(r.tensor, ref) >= 100
    r = HybridDecoder(probe=lambda: parse_simulation(sim.format(0.5))).decode(z, vae, family="sd15")
    assert not r.report.ran.offloaded and "of host memory" in " ".join(o.why for o in r.report.decision.options)


def test_without_a_gpu_exact_tiles_on_the_cpu_when_host_memory_holds_their_buffers_not_a_full_decode():
    """No GPU and 1 GiB of host memory over the reserve: the CPU's full decode needs more (1.05 GiB est.), exact
    tiles on the CPU fit (0.69 GiB) and run first: the image equals the full decode (no tile drift), the report
    names the plan; local tiles stay behind them in the chain."""
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.extension.orchestrator import HybridDecoder
    from hybrid_vae.policy import GpuState, load_profiles

    vae = load_fixture_vae()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.8
    ref = full(vae, to_vae_space(z, load_profiles("").family("sd15"))).clamp(-1, 1)
    cpu = GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu", note="no CUDA",
                   host_available_bytes=3 * 2**30)
    r = HybridDecoder(probe=lambda: cpu).decode(z, vae, family="sd15")
    ran = r.report.ran
    assert ran.path == "cpu" and ran.groupnorm == "exact" and ran.label == "cpu 256px exact", ran.label
    assert [p.label for p in r.report.decision.plans] == ["cpu 256px exact", "cpu 216px/64", "cpu"]
    assert "cpu exact tiles 256px" in r.report.infotext() and psnr(r.tensor, ref) >= 100
