"""The simulated world described for docs/benchmarks.md (a Markdown block; long table rows stay on one line)."""

WORLD_MD = """### The simulated world: where each truth comes from

Nothing in the world calls `policy/estimate.py` or reads a memory or time constant of `families.yaml`
(`tests/test_bench.py` checks both: the world's modules are parsed for such reads, and every kind of execution
gets its truth with the estimator's functions replaced by ones that raise). *Measured* = rows of
`profiles/measured/` (one NVIDIA H200, and this repository's CPU runs); *interpolated* = those rows joined by
piecewise-linear lines in log(bytes) over log(pixels) (beyond the last row: the last segment's slope; where rows
repeat a point: the largest); *assumed* = a range the world draws from, per installation (world seed x card)
unless said otherwise, so the truth can fall on either side of the engine's estimate.

| what | GPU memory (peak bytes) | seconds |
|---|---|---|
| full decode, SD decoder (sd15, sdxl, flux, sd3) | interpolated: H200 full rows by pixels, per dtype size; batches: the measured 2- and 4-item ratios at 1024 px | interpolated: H200 full-decode curve, x the seed's RTX tables for profiled cards (assumed speeds for the others) |
| diffusers' tiles (peers' tiling) | interpolated: H200 tiled rows by tile pixels, then image pixels | measured tiles' full-decode time + a per-tile cost fitted on the 64 tiled rows |
| the engine's local tiles | not measured: diffusers' rows at the same tile x **assumed** U(0.88, 1.12), + its output buffer (one copy, from the executor's code) | as diffusers' tiles |
| exact tiles | not measured on a GPU: **assumed** U(0.26, 0.42) x the full decode's measured peak (whole-image buffers) + U(0.45, 0.85) x a measured full decode of one tile (its working set); the CPU measured 0.95-1.03x the analytic figure | **assumed**: full x 1.08 + 0.15 ms per tile step (the steps **counted** from the pass schedule the executor runs) |
| exact tiles with host buffers (`exact+host`, `bench/world_offload.py`) | **counted**: the whole-image buffers the executor keeps on the GPU and in host memory for the plan's device budget (`policy/passes.py`, what the executor copies, checked against its ledger in `tests/test_offload.py`) + **assumed** exact tiles' working set x U(1.2, 1.7) (the CPU ledger: 1.36-1.46x); host buffers must fit the scenario's free RAM | exact tiles' compute and the **counted** bytes copied at the slower of the card's link (**assumed** 70-88% of the raw PCIe rate from the spec: 4.0 x16 desktops, 5.0 x16 H200, 4.0 x8 laptops, 3.0 x16 RTX 2060) and the machine's staging copies (**assumed** U(8, 30) GB/s), U(55, 95)% of the shorter hidden behind the other (per scenario); the engine assumes PCIe x 24/48/12 GB/s, 16 GB/s staging, 80% hidden |
| HunyuanVideo | interpolated: the 9 H200 rows less one output copy, by frames decoded at once and region pixels; + **assumed** U(1, 2) output copies | fitted on the 9 rows: a x decoded voxels + c x decoder calls |
| Wan | **interpolated**: Wan's decoder measured on a CPU (`cpu-video-decode-*.jsonl`, float32: 8,137 B per frame pixel at 1 frame per step, 21,305 at 4) / a CPU/GPU peak ratio drawn per installation from U(0.72, 0.88): the range measured on the SD decoder (0.74-0.80) and HunyuanVideo's (0.85-0.86), widened by 0.02 each side (assumed); the engine divides by 0.74 | **assumed**: 1.5x HunyuanVideo's (a CPU run took 0.69x HunyuanVideo's seconds for the same latent; not carried over: CPU and GPU seconds need not scale alike) |
| exact Wan tiles (`tile_groupnorm` exact, `bench/truth.py` `tiled_halo`) | Wan's region decode as above at the largest region: the tile + a halo **counted** from diffusers' `AutoencoderKLWan()` decoder (13 latent px, `extension/stream_wan.halo_latent`; a test keeps them equal) clipped to the frame, + one call's frames; **assumed**: the whole-frame mid block 0.1x a one-latent-frame full decode's peak; frames in host memory | Wan's seconds per voxel over the regions' frames x area (**counted** from the tiles) + **assumed** 0.1x a full decode for the mid block + the frames' copies; area-proportional (the CPU measured 0.75x of that for exact tiles and 0.86x for diffusers' at 512x512, `bench/wan_exact.py`) |
| exact HunyuanVideo tiles (`tile_groupnorm` exact/offload, `bench/world_exact3d.py`) | **counted** from diffusers' `AutoencoderKLHunyuanVideo()` defaults (not the profile; a test keeps them equal), with `policy/video_exact.py`'s counts (checked against the executor's ledger in `tests/test_video_exact.py`): the whole-video buffers (in host memory, which must hold them, or on the GPU) and the keys/values + **assumed** the tile's working set U(1.5, 3.0) x the counted tile region and output, per installation (the CPU measured 1.35-1.60x, `bench/hunyuan_exact.py --memory`; the engine assumes 2 x 1.15), + with host buffers one more **counted** region and output in flight on the copy stream (the engine: 3 x 1.15 in all); tiles of the plan's frames (16 or 4 output frames) | the **measured** full decode of the video (H200 video rows) x **assumed** 1.08 + 0.15 ms per counted tile step + (host buffers) the **counted** copies at the slower of the card's link and the staging rate as above, U(55, 95)% of the shorter hidden (**assumed**, as image offload's: the same copy stream since session 10; not overlapped before); the engine assumes the same structure with its figures |
| CPU (`cpu` plans) | host bytes, measured: `profiles/measured/cpu-sd-decode-*.jsonl` (SD decoder, float32, 256-768 px; `bench/cpu_memory.py`); tiles and video: **assumed** GPU truth at float32 x the measured CPU/GPU ratio at 512 px; exact tiles on the CPU: the world's exact-tile truth above at float32 x that ratio | measured CPU rows x **assumed** user CPU 0.15-0.6x this machine; exact tiles x **assumed** U(0.96, 1.36) per installation (the range this project's CPU runs measured; the engine assumes 1.36) |
| remote | - | round trip, upload, server (H200 curve x **assumed** U(1.5, 3) per world), download, encode: **assumed**. The engine is told the link's round trip and rate (as the client would have measured them) and the server's seconds per voxel that the client's own code (`extension/remote/netstats.py`, `record`) infers from 2 earlier replies to the same request, each drawn like a real one (its own round trip, rate and noise): the time to the headers less the round trip and upload it is told; no endpoint reports `X-Decode-Seconds` here (Hugging Face's do not) |

What a real card adds and the estimator does not model (ranges **assumed**, sized from reports):

| effect | in the world | evidence |
|---|---|---|
| cuDNN workspace | U(-32, +96) MiB on every GPU decode, per installation (the H200 rows include that run's workspace; `cudnn.benchmark` on/off changed nothing there) | a cuDNN default algorithm taking 2x the memory on V100 (pytorch/pytorch#13412); `cudnn.benchmark` raising VRAM use (huggingface/diffusers#2793) |
| allocator block rounding | U(0, 48) MiB per decode (a warm UI process; a cold one needed 1.00x its allocated peak under a cap on the H200) | `memory-and-speed.md` note 2 |
| fragmentation | U(0, 30)% of the torch cache cannot hold the decode's blocks, per installation; half the scenarios have a cache of U(0, 60)% of their free memory. The probe reads PyTorch's inactive split bytes ("inactive, non-releasable memory", `torch.cuda.memory_stats`), which the engine does not count as available; the world reports them as that unusable part x U(1.0, 1.5) per installation (split blocks include some large enough for part of the decode; assumed: no GPU here has read a UI's cache) | 5.53 GiB "reserved but unallocated" at an OOM on a 16 GB card (pytorch/pytorch#177406), 9.27 GiB on ROCm (ROCm/TheRock#2844); SD.Next keeping 7.4 GB reserved with nothing active after a decode (vladmandic/sdnext#3416) |
| free memory moving after the probe | 60% nothing, 25% U(0, 64) MiB less, 10% U(64, 400) MiB less, 3% U(0.4, 2) GiB less, 2% U(0, 512) MiB more | a browser's video tab re-allocating ~80 MB per restart, ~300 MB per tab (elFarto/nvidia-vaapi-driver#146); editors holding 2-4 GB (techtactician.com); later decodes using up to 6 GB more than the first (Panchovix/stable-diffusion-webui-reForge#114); ComfyUI keeps 400 MB (Linux) / 600-700 MB (Windows) for other applications (`comfy/model_management.py`) |
| host memory (CPU decodes, host buffers) | 4, 8, 16 or 32 GiB free (15/35/35/15%) per scenario, the same in every world, reported by the probe; a `cpu` plan (or an `exact+host` plan's host buffers) above it fails (an allocator error, the chain goes on; the world does not model Linux's OOM killer ending the process) | users' logs: "total RAM 32694 MB" (Comfy-Org/ComfyUI#5828) |
| (sensitivity only) PyTorch 2.9's conv3d path | video decoders 2-3x the memory on 30% of installations | "another path that takes 3x the memory" (Comfy-Org/ComfyUI#10398, #10373); 6.3 -> 12.7 GB (pytorch/pytorch#177406) |

A failed GPU attempt costs U(0.7, 1.0) of its largest region's time (measured: a failed full fp32 2048 decode
took 0.45-0.65 s of 0.64 s on the H200); a failed host allocation a tenth of that; a remote request fails (HTTP
503) with probability 2%. Seconds carry lognormal noise per card (sigma 0.15), scenario (0.05), decode (0.03) and
link (0.15). Every strategy meets the same draws (common random numbers); a different seed is a different world.
The engine claims a local GPU plan's estimated peak just before it runs (`extension/orchestrator.py`,
`claim_memory`: one allocation handed back to PyTorch's cache): in the world the claim succeeds when that much is
available after the free memory moved (the same test as an attempt, with the engine's estimate in place of the
true peak); a refused claim costs 5 ms (assumed: a failed allocation, a probe and `decide()`), and the first
refusal makes the engine decide again from what a probe sees now (free memory after the move). Peers claim
nothing.
The learned rows of the what-if table first run the engine on 60 decodes per card in another world (other
installations of the same cards; the card speeds of the set's first world); what their warm-up records is that
world's own: seconds, the allocated peak (the
true peak less the block rounding, which PyTorch reserves but does not allocate) and OOMs of plans whose
estimate fit (`bench/matrix.py`, `train_learned`).
A new plan kind gets its truth by registering a function in `bench/truth.py` (see its docstring)."""
