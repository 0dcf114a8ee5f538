"""The measured decodes shipped with the package (``profiles/measured/*.jsonl``), parsed once, in one place.

Every consumer reads the rows through :func:`measured_rows`: the estimator's fit and its held-out report
(``bench/estimator_fit.py``), the test that checks the estimate against every row
(``tests/test_estimator_data.py``), and the simulated world's ground truth (``bench/interp.py``).

Files (raw JSON lines, kept as measured; see ``shared/notes/memory-and-speed.md``):

* ``h200-vae-decode-*.jsonl``: one NVIDIA H200, PyTorch 2.11 + CUDA 13, diffusers 0.42.1, random-weight
  VAEs from the published configs; ``peak_alloc_delta`` = ``torch.cuda.max_memory_allocated()`` during the
  decode minus what was allocated before it. Tiled rows use diffusers' own tiling
  (``tile_sample_min_size = tile``, overlap factor 0.25 unless the row says otherwise).
* ``cpu-sd-decode-*.jsonl``: full float32 decodes on a CPU (``bench/cpu_memory.py``; the row names the machine).
* ``cpu-video-decode-*.jsonl``: full float32 decodes of the Wan and HunyuanVideo decoders on a CPU
  (``bench/video_cpu_memory.py``; tag ``cpu_video``, the family in ``model``; peaks only, no warm median).

Rows that describe no decode the engine runs are skipped: ``channels_last`` (a memory format the engine does
not use), ``oom_retry`` (no peak), ``info``/``end`` (metadata).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Literal

DATA_DIR = Path(__file__).resolve().parent / "measured"
SKIP = frozenset({"channels_last", "oom_retry", "info", "end"})
#: data tag -> the engine's family (sd15/sdxl/flux share one decoder; only the first conv differs)
FAMILY_OF = {"sd15": "sd15", "sdxl": "sdxl", "sdxl_fp16": "sdxl", "flux": "flux", "tilesweep": "sd15",
             "baseline": "sd15", "cudnn_bench": "sd15", "memcap": "sd15", "hunyuan": "hunyuanvideo",
             "cpu_full": "sd15", "cpu_video": ""}  # cpu_video: the family is the row's "model"
Mode = Literal["full", "tiled", "chunked"]


@dataclasses.dataclass(frozen=True)
class MeasuredRow:
    """One measured decode.

    Attributes:
        where (`str`): ``file-stem:line`` of the row. series (`str`): the data tag (``memcap`` for the
            memory-cap runs, which have none); family (`str`): the engine family it describes.
        device (`str`): ``cuda`` (the H200 files) or ``cpu``.
        dtype (`str`): ``float16`` / ``bfloat16`` / ``float32``. width/height (`int`): output pixels.
        frames (`int | None`): output frames (video). batch (`int`): items decoded at once.
        mode (`Mode`): ``full``; ``tiled`` (diffusers' spatial tiling; video: with its 4-latent-frame chunks);
            ``chunked`` (video: diffusers' frame-wise decode, whole frames in temporal chunks).
        tile_px (`int | None`): diffusers' ``tile_sample_min_size``. overlap (`float`): diffusers' tile
            overlap factor (0.25 unless the row says otherwise).
        frame_chunk (`int | None`): latent frames per temporal chunk (video chunked/tiled: 4).
        peak_bytes (`int | None`): peak allocated bytes above what was allocated before the decode.
        seconds (`float | None`): median seconds (None where the row's time is not a warm median).
    """

    where: str
    series: str
    family: str
    device: str
    dtype: str
    width: int
    height: int
    frames: int | None
    batch: int
    mode: Mode
    tile_px: int | None
    overlap: float
    frame_chunk: int | None
    peak_bytes: int | None
    seconds: float | None

    @property
    def dsize(self) -> int:
        """Bytes per element of the decode dtype."""
        return 4 if self.dtype == "float32" else 2

    @property
    def px(self) -> int:
        """Output pixels per frame."""
        return self.width * self.height

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two rows the same decode (repeats of one decode share it)."""
        return (self.series == "memcap", self.device, self.family, self.dtype, self.width, self.height,
                self.frames, self.batch, self.mode, self.tile_px, self.overlap)


def _parse(where: str, r: dict[str, Any]) -> MeasuredRow | None:
    tag = r.get("tag")
    if tag in SKIP:
        return None
    dtype = str(r.get("dtype", "torch.float16")).replace("torch.", "")
    if tag is None:  # memory-cap runs: full decodes, absolute peak minus what was allocated before
        res = int(r["res"])
        return MeasuredRow(where, "memcap", "sd15", "cuda", dtype, res, res, None, 1, "full", None, 0.25, None,
                           int(r["peak_alloc"]) - int(r["base"]), None)
    tag = str(tag)
    if tag not in FAMILY_OF:
        raise ValueError(f"{where}: unknown tag {tag!r}; add it to profiles/measurements.py FAMILY_OF")
    peak = int(r["peak_alloc_delta"]) if "peak_alloc_delta" in r else None
    secs = float(r["median_s"]) if "median_s" in r else None
    device = "cpu" if tag.startswith("cpu") else "cuda"
    if tag == "cpu_video":
        frames, h, w = (int(v) for v in str(r["res"]).split("x"))
        return MeasuredRow(where, tag, str(r["model"]), device, dtype, w, h, frames, 1, "full", None, 0.25, None,
                           peak, None)
    if tag == "hunyuan":
        frames, h, w = (int(v) for v in str(r["res"]).split("x"))
        mode = str(r["mode"])
        if mode == "full":
            return MeasuredRow(where, tag, "hunyuanvideo", device, dtype, w, h, frames, 1, "full", None, 0.25, None,
                               peak, secs)
        if mode == "framewise":
            return MeasuredRow(where, tag, "hunyuanvideo", device, dtype, w, h, frames, 1, "chunked", None, 0.25, 4,
                               peak, secs)
        return MeasuredRow(where, tag, "hunyuanvideo", device, dtype, w, h, frames, 1, "tiled", 256, 0.25, 4,
                           peak, secs)
    res = int(r["res"])
    tile = int(r["tile"]) if "tile" in r else None
    overlap = float(r.get("overlap", 0.25))
    mode = "tiled" if (tag == "tilesweep" or r.get("mode") == "tiled") else "full"
    return MeasuredRow(where, tag, FAMILY_OF[tag], device, dtype, res, res, None, int(r.get("batch", 1)), mode,
                       tile if mode == "tiled" else None, overlap, None, peak, secs)


@functools.lru_cache(maxsize=4)
def _load(folder: str) -> tuple[MeasuredRow, ...]:
    rows: list[MeasuredRow] = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = _parse(f"{f.stem}:{i + 1}", json.loads(line))
            if row is not None:
                rows.append(row)
    return tuple(rows)


def measured_rows(folder: str | Path | None = None, *, device: str | None = "cuda") -> tuple[MeasuredRow, ...]:
    """Every measured decode (cached), in file order.

    Args:
        folder (`str | Path | None`, defaults to the package's ``profiles/measured``): where the JSONL files are.
        device (`str | None`, defaults to ``"cuda"``): keep rows of this device only (``"cpu"``: the CPU
            decodes; None: all).

    Raises:
        FileNotFoundError: the folder has no ``*.jsonl`` file (a broken install).
        ValueError: a row with a tag this loader does not know.
    """
    path = Path(folder) if folder is not None else DATA_DIR
    rows = _load(str(path))
    if not rows:
        raise FileNotFoundError(f"no measured rows in {path} (*.jsonl); the package data is missing: reinstall "
                                "sdnext-hybrid-vae")
    return tuple(r for r in rows if device is None or r.device == device)
