"""What memory the decode can use right now: NVML free + torch's reusable cache, per device.

``probe()`` never raises because NVML, a driver or torch is missing: it falls back
NVML (matched to the torch device by UUID) -> ``torch.cuda.mem_get_info`` (ROCm) -> MPS -> CPU,
and says in ``note`` which source failed and why. Nothing is probed at import time.

Env ``HYBRID_VAE_SIMULATE_GPU`` (``name=NVIDIA GeForce RTX 3070,free_gib=1.0[,total_gib=8][,host_gib=12]``)
replaces the probe with a simulated card for tests and what-if runs; every report shows it.

Host memory (what offloaded exact tiling may use without making the machine swap) is probed beside the
card: ``psutil.virtual_memory().available``, else ``MemAvailable`` of ``/proc/meminfo``; ``None`` when
neither is there (the engine then plans nothing that needs host memory).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any, Literal

from hybrid_vae.policy.env import env_name, read_env
from hybrid_vae.policy.errors import ProfileError

log = logging.getLogger("hybrid_vae")

ENV_SIMULATE = env_name("simulate_gpu")
GiB = 1024**3
#: ``host``: a CPU decode planned like a device decode, against a memory budget (``hybrid-vae serve`` on a CPU).
Source = Literal["nvml", "torch", "mps", "cpu", "simulated", "host"]


def format_gib(b: float) -> str:
    """``1234567890`` -> ``"1.15 GiB"`` (how reasons and reports show memory)."""
    return f"{b / GiB:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class GpuState:
    """A snapshot of one device's memory.

    Attributes:
        name: the device's name (``"cpu"`` without an accelerator).
        uuid: NVML/torch UUID when known.
        total_bytes: total memory.
        free_bytes: free memory as the driver sees it (NVML, or ``mem_get_info``).
        torch_reusable_bytes: memory this process's caching allocator holds but does not use
            (``reserved - active``); available to the decode, invisible to NVML's ``free``.
        torch_fragmented_bytes: of ``torch_reusable_bytes``, the free blocks inside segments that also hold live
            tensors (PyTorch's ``inactive_split_bytes``): the allocator cannot return them to the driver nor carve
            a block larger than each of them from them, so they are not counted as available (the part of them a
            decode's small tensors could still use is given up: a conservative count).
        source: where ``free_bytes`` came from.
        note: why a better source was not used ("" when none failed).
        device: the torch device string the numbers belong to (``cuda:0``, ``mps``, ``cpu``).
        simulated: True when the numbers come from ``HYBRID_VAE_SIMULATE_GPU`` or CLI flags.
        host_available_bytes: host memory available without swapping (None: unknown).
        host_total_bytes: host memory in all (None: unknown).
    """

    name: str
    total_bytes: int
    free_bytes: int
    source: Source
    uuid: str | None = None
    torch_reusable_bytes: int = 0
    torch_fragmented_bytes: int = 0
    note: str = ""
    device: str = "cpu"
    simulated: bool = False
    host_available_bytes: int | None = None
    host_total_bytes: int | None = None

    @property
    def usable_cache_bytes(self) -> int:
        """Torch's reusable cache less its fragmented part."""
        return max(0, self.torch_reusable_bytes - self.torch_fragmented_bytes)

    @property
    def available_bytes(self) -> int:
        """Memory a decode may use: free + torch's reusable cache, less the cache's fragmented part."""
        return self.free_bytes + self.usable_cache_bytes

    @property
    def is_accelerator(self) -> bool:
        return self.source != "cpu"

    def capped(self, max_available: int, why: str) -> GpuState:
        """This state with at most ``max_available`` bytes available (what a refused claim measured: that many
        could not be allocated). The excess comes off torch's usable cache first (a cache that could not give one
        block is more fragmented than counted), then off the free memory; ``why`` joins the note. Unchanged when
        already under."""
        cut = self.available_bytes - max(0, max_available)
        if cut <= 0:
            return self
        from_cache = min(self.usable_cache_bytes, cut)
        note = f"{self.note}; {why}" if self.note else why
        return dataclasses.replace(self, torch_reusable_bytes=self.torch_reusable_bytes - from_cache,
                                   free_bytes=max(0, self.free_bytes - (cut - from_cache)), note=note)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["available_bytes"] = self.available_bytes
        return d


#: Largest memory a simulated card may have (GiB); the profiles' ``total_gib`` has the same bound.
MAX_SIM_GIB = 4096.0
_SIM_EXAMPLE = "e.g. 'name=NVIDIA GeForce RTX 3070,free_gib=1.0' (total_gib: from the card's profile)"


def vendor_note(name: str) -> str | None:
    """What the engine can and cannot read on a non-NVIDIA card, from its name (None for NVIDIA/unknown).

    AMD (ROCm builds of torch): ``torch.cuda.mem_get_info`` gives free/total (NVML does not apply) and
    torch's cache is read as on NVIDIA. Apple silicon (MPS): memory is *unified*, shared with the CPU and
    every app, not VRAM; torch gives ``recommended_max_memory`` (the total the engine uses) and what its own
    MPS allocator holds, never what other apps use.
    """
    n = name.lower()
    if "apple" in n or n == "mps" or re.search(r"\bm[1-9]( (pro|max|ultra))?\b", n):
        return ("Apple silicon (MPS): unified memory shared with the CPU and every app, not VRAM; the engine reads "
                "torch.mps.recommended_max_memory() as the total and subtracts only what torch's MPS allocator holds "
                "(other apps' use is invisible: raise the reserve); no NVML, no measured profile (generic speed; "
                "`hybrid-vae calibrate` measures it)")
    if any(k in n for k in ("amd", "radeon", "instinct")):
        return ("AMD (ROCm): free and total memory come from torch.cuda.mem_get_info (HIP; NVML does not apply), "
                "torch's cache is read as on NVIDIA; no measured profile (generic speed; `hybrid-vae calibrate` "
                "measures it)")
    if "intel" in n or re.search(r"\barc\b", n):
        return "Intel GPU (XPU): not probed by hybrid-vae (it sees a CPU); decodes run where the VAE is"
    return None


def _builtin_total(name: str) -> float | None:
    """Total GiB of a card in the built-in profiles (simulations that name a card but give no total)."""
    from hybrid_vae.policy.profiles import load_profiles

    try:
        prof = load_profiles("").gpu(name)
    except ProfileError:
        return None
    return prof.total_gib if prof is not None else None


def simulated_gpu(name: str | None, *, free_gib: float | None, total_gib: float | None = None,
                  reusable_gib: float = 0.0, host_gib: float | None = None,
                  total_for: Callable[[str], float | None] | None = None, origin: str = ENV_SIMULATE,
                  fields: dict[str, str] | None = None, note: str = "") -> GpuState:
    """A simulated card, every number checked; errors name ``origin`` and the field.

    Args:
        name (`str | None`): the card's name (None: ``"Simulated GPU"``).
        free_gib (`float | None`): free memory; None: the total.
        total_gib (`float | None`): total memory; None: ``total_for(name)`` (default: the built-in
            profiles), else an error (a simulation never guesses a card's size).
        reusable_gib (`float`, defaults to 0): torch's reusable cache on top of ``free_gib``.
        host_gib (`float | None`): host memory available (and total); None: unknown (``with_host`` fills in the
            machine's).
        origin (`str`): what the numbers came from, for messages (the env var, or CLI flags).
        fields (`dict[str, str] | None`): command-line flags for the fields (``{"free_gib": "--free-gib"}``);
            errors then read ``--free-gib -2: give ...``.

    Raises:
        ProfileError: a number that is not finite, negative or above 4096 GiB, free above total, or
            no total for an unprofiled name.
    """
    spell = fields or {}

    def bad(key: str, value: object, msg: str) -> ProfileError:
        if key in spell:  # a command-line flag: "--free-gib -2: give ..."
            shown = "" if value is None else f" {value:g}" if isinstance(value, float) else f" {value}"
            exc = ProfileError(f"{spell[key]}{shown}: {msg}")
            exc.key_path = spell[key]
            return exc
        return ProfileError(msg, file=origin, key_path=key, value=value)

    for key, v in (("free_gib", free_gib), ("total_gib", total_gib), ("reusable_gib", reusable_gib),
                   ("host_gib", host_gib)):
        if v is None:
            continue
        if not math.isfinite(v) or not 0 <= v <= MAX_SIM_GIB:
            raise bad(key, v, f"give a number of GiB between 0 and {MAX_SIM_GIB:g}")
    label = name or "Simulated GPU"
    total = total_gib
    if total is None and name:
        total = (total_for or _builtin_total)(name)
    if total is None:
        total = free_gib
    if total is None:
        raise bad("free_gib", None, f"missing: give free_gib (and total_gib for a card without a profile); {_SIM_EXAMPLE}")
    free = total if free_gib is None else free_gib
    if free > total:
        hint = "the card's profile" if total_gib is None else spell.get("total_gib", "total_gib")
        raise bad("free_gib", free, f"more than the card's {total:g} GiB total (from {hint}); "
                                    f"give free <= total, or a larger {spell.get('total_gib', 'total_gib')}")
    host = None if host_gib is None else int(host_gib * GiB)
    return GpuState(name=label, total_bytes=int(total * GiB), free_bytes=int(free * GiB),
                    torch_reusable_bytes=int(reusable_gib * GiB), source="simulated", device="simulated",
                    simulated=True, note=note or f"simulated by {origin}", host_available_bytes=host,
                    host_total_bytes=host)


def parse_simulation(spec: str, *, total_for: Callable[[str], float | None] | None = None) -> GpuState:
    """Parse ``name=...,free_gib=...[,total_gib=...][,reusable_gib=...]`` into a simulated state.

    Fields are comma-separated ``key=value`` pairs; ``free_gib`` is required. ``total_gib`` defaults
    to ``total_for(name)`` (default: the card's built-in profile), else to ``free_gib``.

    Raises:
        ProfileError: naming ``HYBRID_VAE_SIMULATE_GPU``, the field and the value, with the fix.
    """
    fields: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ProfileError(f"expected key=value pairs separated by commas, {_SIM_EXAMPLE}",
                               file=ENV_SIMULATE, key_path=part.strip(), value=spec)
        k, v = part.split("=", 1)
        k = k.strip()
        if k in fields:
            raise ProfileError("given twice", file=ENV_SIMULATE, key_path=k, value=spec)
        fields[k] = v.strip()
    allowed = {"name", "free_gib", "total_gib", "reusable_gib", "host_gib"}
    for k in fields:
        if k not in allowed:
            raise ProfileError(f"unknown key; allowed: {', '.join(sorted(allowed))}", file=ENV_SIMULATE,
                               key_path=k, value=fields[k])
    name = fields.get("name")
    if name is not None and (not name or any(c in name for c in "=;")):
        raise ProfileError("a card name is not empty and has no '=' or ';'; separate fields with commas, "
                           + _SIM_EXAMPLE, file=ENV_SIMULATE, key_path="name", value=name)
    if "free_gib" not in fields:
        raise ProfileError(f"free_gib is missing; {_SIM_EXAMPLE}", file=ENV_SIMULATE, key_path="free_gib",
                           value=spec)
    nums: dict[str, float] = {}
    for k in ("free_gib", "total_gib", "reusable_gib", "host_gib"):
        if k in fields:
            try:
                nums[k] = float(fields[k])
            except ValueError:
                nums[k] = math.nan
            if not math.isfinite(nums[k]) or not 0 <= nums[k] <= MAX_SIM_GIB:
                raise ProfileError(f"give a number of GiB between 0 and {MAX_SIM_GIB:g}", file=ENV_SIMULATE,
                                   key_path=k, value=fields[k])
    return simulated_gpu(name, free_gib=nums["free_gib"], total_gib=nums.get("total_gib"),
                         reusable_gib=nums.get("reusable_gib", 0.0), host_gib=nums.get("host_gib"),
                         total_for=total_for, note=f"simulated by {ENV_SIMULATE}={spec!r}")


def host_memory() -> tuple[int, int] | None:
    """``(total, available)`` bytes of this machine's RAM now, or None when it cannot be read.

    Linux: ``MemTotal``/``MemAvailable`` of ``/proc/meminfo`` (available = what can be allocated without
    swapping, page cache included); elsewhere psutil, else ``os.sysconf`` total and free pages. Never raises.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except (ImportError, OSError, RuntimeError, AttributeError):
        log.debug("psutil unavailable for host memory", exc_info=True)
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (OSError, ValueError, AttributeError):
        return None


def with_host(state: GpuState) -> GpuState:
    """``state`` with this machine's host memory filled in (unless it already has a figure)."""
    if state.host_available_bytes is not None:
        return state
    mem = host_memory()
    if mem is None:
        return state
    total, avail = mem
    return dataclasses.replace(state, host_available_bytes=avail, host_total_bytes=total)


def _torch() -> Any:
    try:
        import torch
    except Exception as exc:  # torch broken or absent: report, never raise
        return exc
    return torch


def _visible_index(torch: Any, device: str | int | None) -> int:
    if device is None:
        return int(torch.cuda.current_device())
    if isinstance(device, int):
        return device
    s = str(device)
    return int(s.split(":", 1)[1]) if ":" in s else int(torch.cuda.current_device())


def _nvml_by_uuid(uuid: str | None, torch_name: str, index: int) -> tuple[int, int, str, str] | str:
    """(total, free, name, uuid) from NVML for the device with ``uuid``; or an error text."""
    try:
        import pynvml
    except Exception as exc:
        return f"NVML unavailable ({type(exc).__name__}: {exc}); install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return f"NVML init failed ({exc})"
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        match = None
        for h in handles:
            u = pynvml.nvmlDeviceGetUUID(h)
            u = u.decode() if isinstance(u, bytes) else str(u)
            if uuid and _norm_uuid(u) == _norm_uuid(uuid):
                match = (h, u)
                break
        if match is None:
            if uuid:
                return f"no NVML device has the torch device's UUID {uuid}"
            if count == 1:  # no UUID from torch (old torch): only safe when there is one device
                u = pynvml.nvmlDeviceGetUUID(handles[0])
                match = (handles[0], u.decode() if isinstance(u, bytes) else str(u))
            else:
                return f"torch gives no UUID and NVML sees {count} devices; cannot match device {index}"
        h, u = match
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        return int(mem.total), int(mem.free), name or torch_name, u
    except Exception as exc:
        return f"NVML query failed ({exc})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def _norm_uuid(u: str) -> str:
    u = u.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if u.startswith(prefix):
            u = u[len(prefix):]
    return u.replace("-", "")


def probe(device: str | int | None = None, *, simulate: str | None = None,
          total_for: Callable[[str], float | None] | None = None) -> GpuState:
    """Read the memory of ``device`` (default: torch's current CUDA device) now.

    Args:
        device: ``"cuda:1"``, ``1``, ``"mps"``, ``"cpu"`` or ``None``.
        simulate: a simulation spec; ``None`` reads env ``HYBRID_VAE_SIMULATE_GPU``.
        total_for: looks up a profiled card's total for simulations that give only a name.
    """
    return with_host(_probe_device(device, simulate=simulate, total_for=total_for))


def _probe_device(device: str | int | None, *, simulate: str | None,
                  total_for: Callable[[str], float | None] | None) -> GpuState:
    spec = simulate if simulate is not None else (read_env().simulate_gpu or "")
    if spec.strip():
        state = parse_simulation(spec, total_for=total_for)
        log.warning("hybrid-vae: GPU SIMULATED (%s): %s, %.2f GiB free", ENV_SIMULATE, state.name,
                    state.free_bytes / GiB)
        return state
    notes: list[str] = []
    torch = _torch()
    if isinstance(torch, Exception):
        return GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu",
                        note=f"torch unavailable ({torch})")
    want_cuda = device is None or isinstance(device, int) or str(device).startswith("cuda")
    if want_cuda:
        try:
            has_cuda = bool(torch.cuda.is_available())
        except Exception as exc:
            has_cuda = False
            notes.append(f"torch.cuda.is_available failed ({exc})")
        if has_cuda:
            idx = _visible_index(torch, device)
            props = torch.cuda.get_device_properties(idx)
            uuid = getattr(props, "uuid", None)
            uuid_s = str(uuid) if uuid is not None else None
            reusable = fragmented = 0
            try:
                stats = torch.cuda.memory_stats(idx)
                reusable = max(0, int(stats.get("reserved_bytes.all.current", 0))
                               - int(stats.get("active_bytes.all.current", 0)))
                fragmented = min(reusable, max(0, int(stats.get("inactive_split_bytes.all.current", 0))))
            except Exception as exc:
                notes.append(f"torch.cuda.memory_stats failed ({exc})")
            is_rocm = getattr(torch.version, "hip", None) is not None
            nv = "ROCm build: NVML does not apply" if is_rocm else _nvml_by_uuid(uuid_s, props.name, idx)
            if isinstance(nv, tuple):
                total, free, name, u = nv
                return GpuState(name=name, uuid=u, total_bytes=total, free_bytes=free, torch_reusable_bytes=reusable,
                                torch_fragmented_bytes=fragmented, source="nvml", note="; ".join(notes),
                                device=f"cuda:{idx}")
            notes.append(nv)
            try:
                free, total = torch.cuda.mem_get_info(idx)
                return GpuState(name=str(props.name), uuid=uuid_s, total_bytes=int(total), free_bytes=int(free),
                                torch_reusable_bytes=reusable, torch_fragmented_bytes=fragmented, source="torch",
                                note="; ".join(notes),
                                device=f"cuda:{idx}")
            except Exception as exc:
                notes.append(f"torch.cuda.mem_get_info failed ({exc})")
        elif device is not None and str(device).startswith("cuda"):
            notes.append("CUDA is not available")
    try:
        mps = getattr(torch.backends, "mps", None)
        if (device is None or str(device) == "mps") and mps is not None and mps.is_available():
            total = int(torch.mps.recommended_max_memory())
            used = int(torch.mps.driver_allocated_memory())
            return GpuState(name="Apple MPS", total_bytes=total, free_bytes=max(0, total - used), source="mps",
                            note="; ".join(notes), device="mps")
    except Exception as exc:
        notes.append(f"MPS query failed ({exc})")
    if not notes:
        notes.append("no CUDA or MPS device")
    return GpuState(name="cpu", total_bytes=0, free_bytes=0, source="cpu", note="; ".join(notes), device="cpu")
