"""The server's decode service: served VAEs, admission checks, a batching queue, plan execution.

One worker thread owns the device and runs one decode at a time (a GPU gains nothing from two VAE
decodes racing for its memory). Requests for the same family and the same latent shape that wait in
the queue together are concatenated into one batch when the engine says the whole batch fits a full
decode; otherwise they run one by one. The worker waits for companions only while other requests are
still uploading (at most ``batch_window_s``), so a lone request never pays the window.

The server applies the engine to itself, bounded by its own memory budget (``memory_budget_bytes``,
``hybrid-vae serve --memory-budget``; default: the memory free when it starts, less the reserve; on a
CPU server, the machine's available RAM). Each decode is planned by :func:`policy.decide` against the
budget less what the admitted requests hold (their latents and outputs on a CPU server) and against the
memory free at that moment: ``full`` when it fits, else items one by one, exact or local tiles, the
same plans on a CPU server as on a GPU. Run with :func:`extension.executors.run_plan`; an
out-of-memory error moves on to the next plan of the chain. A request whose smallest plan can never
fit the budget is refused (413) before its body is read; one that does not fit *now* waits for memory
(a :class:`MemoryLedger` admits requests in arrival order) and gets 503 + ``Retry-After`` only after
``queue_timeout_s``. A GPU server never falls back to its CPU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hybrid_vae.policy.decide import decide
from hybrid_vae.policy.errors import HybridVAEError
from hybrid_vae.policy.gpu import GiB, GpuState, format_gib, host_memory, probe
from hybrid_vae.policy.model import Decision, DecodeJob, DecodeSettings
from hybrid_vae.policy.profiles import Family, Profiles
from hybrid_vae.server.protocol import BadRequest, DecodeRequest

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hybrid_vae.server")

#: A served model: a diffusers VAE, or a zero-argument callable that loads one on first use.
VaeOrLoader = Any


class ServedVAE:
    """One served family: its profile, and its VAE placed on the device once (loaded lazily)."""

    def __init__(self, name: str, family: Family, source: VaeOrLoader, *, device: str) -> None:
        if hasattr(source, "decode"):
            self._vae, self._loader = source, None
        elif callable(source):
            self._vae, self._loader = None, source
        else:
            raise TypeError(f"family {name!r}: expected a diffusers VAE or a loader callable, got "
                            f"{type(source).__name__}")
        self.name, self.family, self.device = name, family, device
        self._lock = threading.Lock()
        self._placed = False
        self.error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._vae is not None and self._placed

    def get(self) -> Any:
        """The VAE on the server's device (loads it on first use; load errors are kept for /health)."""
        with self._lock:
            if self._vae is None:
                assert self._loader is not None
                try:
                    self._vae = self._loader()
                except Exception as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                    raise
            if not self._placed:
                self._vae = self._vae.to(self.device).eval()
                self._placed = True
            return self._vae

    @property
    def dtype_name(self) -> str:
        if self._vae is None:
            return self.family.default_dtype
        force = getattr(getattr(self._vae, "config", None), "force_upcast", None)
        if force if force is not None else self.family.force_upcast:
            return "float32"
        for p in self._vae.parameters():
            return str(p.dtype).rsplit(".", 1)[-1]
        return "float32"

    def info(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "class": type(self._vae).__name__ if self._vae is not None else None,
                "dtype": self.dtype_name if self._vae is not None else None, "video": self.family.video,
                "latent_channels": self.family.latent_channels, "packed": self.family.packed, "error": self.error}


class MemoryLedger:
    """What admitted requests hold against the server's memory budget, admitted in arrival order.

    Each request reserves ``hold`` (bytes it keeps for its whole life: on a CPU server its latent and
    output) and declares ``smallest`` (its smallest plan's working memory). One decode runs at a time,
    so a request gets in when ``sum(holds) + max(smallest) <= budget`` over every admitted request and
    itself: whichever request the worker picks, its smallest plan fits what the others leave. A request
    that does not fit waits; those behind it wait too (no starvation of large requests).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        self._held: dict[int, tuple[int, int]] = {}
        self._line: collections.deque[int] = collections.deque()

    def fits_ever(self, hold: int, smallest: int) -> bool:
        return hold + smallest <= self.budget

    def try_reserve(self, key: int, hold: int, smallest: int) -> bool:
        """Reserve for ``key`` if it is first in line and fits now; else join the line (False)."""
        with self._lock:
            if key in self._held:
                return True
            if key not in self._line:
                self._line.append(key)
            if self._line[0] != key:
                return False
            need = sum(h for h, _ in self._held.values()) + hold + max([smallest, *(m for _, m in self._held.values())])
            if need > self.budget:
                return False
            self._line.popleft()
            self._held[key] = (hold, smallest)
            return True

    def release(self, key: int) -> None:
        with self._lock:
            self._held.pop(key, None)
            with contextlib.suppress(ValueError):
                self._line.remove(key)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(h for h, _ in self._held.values())

    def info(self) -> dict[str, int]:
        with self._lock:
            return {"budget_bytes": self.budget, "held_bytes": sum(h for h, _ in self._held.values()),
                    "admitted": len(self._held), "waiting_for_memory": len(self._line)}


def default_budget(gpu: GpuState, reserve_bytes: int, workers: int = 1) -> int:
    """The budget when none is given: the memory free now (a GPU: NVML free + torch's cache; a CPU: the
    machine's available RAM) less ``reserve_bytes``, shared by ``workers`` processes."""
    if gpu.is_accelerator:
        free = gpu.available_bytes
    else:
        mem = host_memory()
        free = mem[1] if mem is not None else 4 * GiB
    return max(0, (free - reserve_bytes) // max(1, workers))


@dataclasses.dataclass
class _Item:
    served: ServedVAE
    req: DecodeRequest
    z: Any  # VAE-space latent, float32, CPU
    future: concurrent.futures.Future[tuple[Any, dict[str, Any]]]


class DecodeService:
    """Admission, batching queue and plan execution for the served families.

    Args:
        served (`Mapping[str, ServedVAE]`): families by name.
        profiles (`Profiles`): the engine's profiles.
        device (`str`): ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        max_output_pixels (`int`, defaults to `2**27`): output voxels (B x F x H x W) accepted per request.
        batch_window_s (`float`, defaults to `0.004`): how long the worker waits for companions to a request
            while other uploads are in progress.
        max_batch (`int`, defaults to `8`): images decoded together at most.
        reserve_bytes (`int`, defaults to 512 MiB): memory left free for the runtime and other processes
            (also under the budget's default; a CPU's first decode alone allocates 100-200 MB of runtime state).
        probe_fn (`Callable[[], GpuState] | None`): reads the device (default :func:`policy.gpu.probe`).
        memory_budget_bytes (`int | None`, defaults to `None`): the most memory this server's decodes and
            the requests it holds may use (see :class:`MemoryLedger`); None: :func:`default_budget` at start.
        queue_timeout_s (`float`, defaults to `60`): how long a request waits for memory before 503.
        workers (`int`, defaults to `1`): server processes on this machine; the default budget is shared.
    """

    def __init__(self, served: Mapping[str, ServedVAE], *, profiles: Profiles, device: str,
                 max_output_pixels: int = 2**27, batch_window_s: float = 0.004, max_batch: int = 8,
                 reserve_bytes: int = 512 * 1024**2, probe_fn: Callable[[], GpuState] | None = None,
                 memory_budget_bytes: int | None = None, queue_timeout_s: float = 60.0, workers: int = 1) -> None:
        self.served, self.profiles, self.device = dict(served), profiles, device
        self.max_output_pixels, self.batch_window_s, self.max_batch = max_output_pixels, batch_window_s, max_batch
        self.reserve_bytes = reserve_bytes
        # the reserve is taken off the free memory below; the budget itself is all the decode may use
        self.settings = DecodeSettings(allow_remote=False, allow_cpu=False, reserve_bytes=0)
        self._probe = probe_fn or (lambda: probe(device, total_for=lambda n: (p.total_gib if (p := profiles.gpu(n)) else None)))
        self._budget_arg = memory_budget_bytes
        self.workers = workers
        self._ledger: MemoryLedger | None = None
        self.queue_timeout_s = queue_timeout_s
        self._keys = itertools.count(1)
        self._cv = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._uploading = 0
        self._busy = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "decodes": 0, "batches": 0, "batched_items": 0, "max_batch_seen": 0,
                         "errors": 0}
        self.last_plan: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="hybrid-vae-decode", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- admission (before the body is read) -----------------------------------------------------
    def gpu(self) -> GpuState:
        return self._probe()

    def _job(self, served: ServedVAE, batch: int, frames: int | None, h: int, w: int) -> DecodeJob:
        return DecodeJob(family=served.name, width=w, height=h, batch=batch, frames=frames,
                         dtype=served.dtype_name, vae_resident=True)  # type: ignore[arg-type]

    @property
    def ledger(self) -> MemoryLedger:
        """The budget's ledger (the default budget is read on first use, after the VAEs are loaded)."""
        if self._ledger is None:
            budget = self._budget_arg
            if budget is None:
                budget = default_budget(self.gpu(), self.reserve_bytes, self.workers)
                log.info("hybrid-vae serve: memory budget %s (free now less the %s reserve)", format_gib(budget),
                         format_gib(self.reserve_bytes))
            self._ledger = MemoryLedger(budget)
        return self._ledger

    def on_host(self) -> bool:
        """Decodes and held requests live in host RAM (a CPU server) rather than device memory."""
        return not self.gpu().is_accelerator or self.device == "cpu"

    def hold_bytes(self, req: DecodeRequest) -> int:
        """Host bytes a request keeps while admitted on a CPU server: its body, the float32 latent, the
        float32 output and its uint8 copy and encoding (0 on a GPU server: the budget is device memory)."""
        if not self.on_host():
            return 0
        latent = math.prod(req.shape) * 4
        return req.body_bytes + latent + 3 * req.voxels * (4 + 1 + 1)

    def plan_state(self, held: int) -> GpuState:
        """The device as the engine should see it for one decode now: the budget less ``held``, and never
        more than is free (less the reserve); a CPU is planned like a device (source ``host``)."""
        real = self.gpu()
        if real.is_accelerator:
            now = real.available_bytes - self.reserve_bytes
        else:
            mem = host_memory()
            now = (mem[1] if mem is not None else self.ledger.budget) - self.reserve_bytes
        free = max(0, min(self.ledger.budget - held, now))
        src = real.source if real.is_accelerator else "host"
        return dataclasses.replace(real, free_bytes=free, torch_reusable_bytes=0, torch_fragmented_bytes=0, source=src,  # type: ignore[arg-type]
                                   total_bytes=max(real.total_bytes, self.ledger.budget),
                                   note=f"server budget {format_gib(self.ledger.budget)} less {format_gib(held)} held"
                                        + (f"; {real.note}" if real.note else ""))

    def smallest_need(self, served: ServedVAE, req: DecodeRequest) -> int:
        """The least working memory any local plan needs for ``req`` (one item at a time, smallest tile)."""
        state = dataclasses.replace(self.plan_state(0), free_bytes=self.ledger.budget)
        try:
            d = decide(self._job(served, req.batch, req.frames, req.height, req.width), state, self.profiles,
                       self.settings.updated(allow_cpu=True))
        except HybridVAEError as exc:
            raise BadRequest(f"cannot plan this decode: {exc}", field="shape", status=422) from None
        return min(o.plan.estimate.peak_bytes for o in d.options if o.plan.path in ("full", "tiled"))

    def admit(self, served: ServedVAE, req: DecodeRequest) -> tuple[int, int]:
        """Refuse, with nothing allocated, a request this server can never decode; else return its
        ``(hold, smallest)`` bytes for :meth:`MemoryLedger.try_reserve`.

        Raises:
            BadRequest: 422 when the output exceeds ``max_output_pixels``; 413 when even the smallest plan
                (one item at a time, the smallest tile) plus what the request holds exceeds the budget.
        """
        if req.voxels > self.max_output_pixels:
            raise BadRequest(f"output of {req.voxels:,} pixels (batch x frames x {req.height}x{req.width}) exceeds "
                             f"this server's limit of {self.max_output_pixels:,}; send smaller batches or "
                             "raise --max-output-pixels", field="shape", status=422)
        hold, smallest = self.hold_bytes(req), self.smallest_need(served, req)
        if not self.ledger.fits_ever(hold, smallest):
            raise BadRequest(f"decode needs at least {format_gib(smallest + hold)} even in the smallest tile, item by "
                             f"item ({format_gib(smallest)} decode + {format_gib(hold)} for the request itself); this "
                             f"server's memory budget is {format_gib(self.ledger.budget)} (--memory-budget); send "
                             "a smaller size or batch", field="shape", status=413)
        return hold, smallest

    @contextlib.contextmanager
    def reserved(self, hold: int, smallest: int) -> Iterator[None]:
        """Hold a place in the budget for the block (blocking callers such as the Inference Endpoints
        handler; the HTTP app waits without a thread). 503 after ``queue_timeout_s``."""
        key = -next(self._keys)  # negative: never one of the app's keys
        end = time.monotonic() + self.queue_timeout_s
        try:
            while not self.ledger.try_reserve(key, hold, smallest):
                if time.monotonic() >= end:
                    raise BadRequest(f"waited {self.queue_timeout_s:g} s for memory; retry later", field="memory",
                                     status=503, headers={"Retry-After": "5"})
                time.sleep(0.02)
            yield
        finally:
            self.ledger.release(key)

    @contextlib.contextmanager
    def uploading(self) -> Iterator[None]:
        """Mark a request whose body is being received (the batching window waits only for these)."""
        with self._cv:
            self._uploading += 1
        try:
            yield
        finally:
            with self._cv:
                self._uploading -= 1
                self._cv.notify_all()

    # ---- queue -----------------------------------------------------------------------------------
    def submit(self, served: ServedVAE, req: DecodeRequest, z: torch.Tensor
               ) -> concurrent.futures.Future[tuple[Any, dict[str, Any]]]:
        """Queue a normalised latent; the future gives ``(float [-1, 1] CPU tensor, meta)``."""
        fut: concurrent.futures.Future[tuple[Any, dict[str, Any]]] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise BadRequest("server is shutting down", status=503, headers={"Retry-After": "1"})
            self.counters["requests"] += 1
            self._queue.append(_Item(served, req, z, fut))
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return fut

    def _compatible(self, a: _Item, b: _Item, voxels: int) -> bool:
        return (a.served is b.served and a.req.frames is None and b.req.frames is None
                and tuple(a.z.shape[1:]) == tuple(b.z.shape[1:])
                and voxels + b.req.voxels <= self.max_output_pixels)

    def _collect(self) -> list[_Item] | None:
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            batch = [first]
            if first.req.frames is None and self.max_batch > 1:
                end = time.monotonic() + self.batch_window_s
                while len(batch) < self.max_batch:
                    voxels = sum(i.req.voxels for i in batch)
                    for item in list(self._queue):
                        if len(batch) < self.max_batch and self._compatible(first, item, voxels):
                            self._queue.remove(item)
                            batch.append(item)
                            voxels += item.req.voxels
                    remaining = end - time.monotonic()
                    if len(batch) >= self.max_batch or remaining <= 0 or self._uploading == 0:
                        break
                    self._cv.wait(remaining)
            self._busy = len(batch)
            return batch

    def decode_batch(self, entries: Sequence[tuple[ServedVAE, DecodeRequest, Any]]
                     ) -> list[concurrent.futures.Future[tuple[Any, dict[str, Any]]]]:
        """Decode ``(served, request, normalised latent)`` entries on this thread, for a batcher outside this
        service (Ray Serve's ``@serve.batch``): compatible entries (same family and latent shape, images
        only, together within ``max_batch`` and ``max_output_pixels``) run as one decode when the engine
        says the whole batch fits, else one by one, as in the service's own queue.

        Returns:
            one finished future per entry, in order: ``(float [-1, 1] CPU tensor, meta)`` or the exception.
        """
        items = [_Item(s, r, z, concurrent.futures.Future()) for s, r, z in entries]
        with self._cv:
            self.counters["requests"] += len(items)
        pending = list(items)
        while pending:
            first = pending.pop(0)
            group, voxels = [first], first.req.voxels
            for item in list(pending):
                if len(group) < self.max_batch and self._compatible(first, item, voxels):
                    pending.remove(item)
                    group.append(item)
                    voxels += item.req.voxels
            with self._cv:
                self._busy = len(group)
            try:
                self._execute(group)
            finally:
                with self._cv:
                    self._busy = 0
        return [i.future for i in items]

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                with self._cv:
                    self._busy = 0

    def _execute(self, batch: list[_Item]) -> None:
        items = [i for i in batch if i.future.set_running_or_notify_cancel()]
        if items:
            self._run(items)

    def _run(self, items: list[_Item]) -> None:
        import torch

        try:
            z = items[0].z if len(items) == 1 else torch.cat([i.z for i in items])
            out, meta = self.decode_now(items[0].served, z, items[0].req, batch=int(z.shape[0]))
        except Exception as exc:
            if len(items) > 1 and not isinstance(exc, BadRequest):
                for i in items:  # a batch failure: give each request its own chance
                    self._run([i])
                return
            with self._cv:
                self.counters["errors"] += len(items)
            for i in items:
                i.future.set_exception(exc)
            return
        with self._cv:
            self.counters["decodes"] += len(items)
            self.counters["batches"] += 1
            if len(items) > 1:
                self.counters["batched_items"] += len(items)
            self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(items))
        start = 0
        for i in items:
            n = int(i.z.shape[0])
            i.future.set_result((out[start:start + n], meta))
            start += n

    # ---- one decode ------------------------------------------------------------------------------
    def decode_now(self, served: ServedVAE, z: torch.Tensor, req: DecodeRequest, *,
                   batch: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Decide and run the plan chain for ``z`` (VAE space) on this thread.

        Returns:
            ``(float [-1, 1] CPU tensor, meta)``; meta has ``plan``, ``seconds``, ``batch``, ``reason``.

        Raises:
            BadRequest: 503 (with Retry-After) when no plan fits the device now; 422 when it never can.
        """
        from hybrid_vae.extension.executors import run_plan
        from hybrid_vae.extension.orchestrator import is_oom
        from hybrid_vae.extension.stream import settings_for_vae

        vae = served.get()
        b = int(z.shape[0])
        settings = settings_for_vae(self.settings, vae, served.family)
        job = self._job(served, b, req.frames, req.height, req.width)
        d = self._decide_when_it_fits(job, settings)
        if b > 1 and (d.chosen.path != "full" or d.chosen.slice_batch):
            # the batch does not fit at once: one by one (each with its own decision)
            parts = [self.decode_now(served, z[i:i + 1], req) for i in range(b)]
            import torch

            return torch.cat([p[0] for p in parts]), {**parts[0][1], "batch": b, "plan": f"{parts[0][1]['plan']} x{b}"}
        t0 = time.perf_counter()
        errors = []
        for plan in d.plans:
            try:
                out = run_plan(plan, vae, z, family=served.family)
                x = out.float().cpu()
                del out
            except Exception as exc:
                if not is_oom(exc):
                    raise
                errors.append(f"{plan.label}: out of memory")
                log.warning("hybrid-vae serve: %s ran out of memory; next plan", plan.label)
            else:
                secs = time.perf_counter() - t0
                self.last_plan = plan.label
                return x, {"plan": plan.label, "seconds": secs, "batch": batch or b, "reason": d.reason}
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        raise BadRequest(f"every plan ran out of memory ({'; '.join(errors)}); retry later", status=503,
                         headers={"Retry-After": "2"})

    def _decide_when_it_fits(self, job: DecodeJob, settings: DecodeSettings) -> Decision:
        """The engine's decision against the budget less what is held; when nothing fits the memory free
        right now (another process holds it), wait up to ``queue_timeout_s``, then 503."""
        end = time.monotonic() + self.queue_timeout_s
        while True:
            state = self.plan_state(self.ledger.held_bytes())
            try:
                return decide(job, state, self.profiles, settings)
            except HybridVAEError as exc:
                if time.monotonic() >= end:
                    raise BadRequest(f"no plan fits the {format_gib(state.free_bytes)} free on {state.name} now "
                                     f"({exc}); retry later", status=503, headers={"Retry-After": "5"}) from None
            time.sleep(0.25)

    # ---- health ----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        gpu = self.gpu()
        with self._cv:
            queue = {"waiting": len(self._queue), "uploading": self._uploading, "decoding": self._busy,
                     **self.counters}
        return {"status": "ok", "families": {k: v.info() for k, v in self.served.items()},
                "device": {"device": self.device, "name": gpu.name, "source": gpu.source,
                           "total_bytes": gpu.total_bytes, "available_bytes": gpu.available_bytes,
                           "simulated": gpu.simulated},
                "queue": queue, "memory": self.ledger.info(),
                "busy": bool(queue["decoding"] or queue["waiting"]), "last_plan": self.last_plan}
