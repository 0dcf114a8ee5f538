"""The exact tiler's memory: the decode's own accounting of the compute device (:class:`Ledger`), the
whole-image buffers (:class:`Store`: on the device or in host memory) and the copies of tiles between them
(:class:`Mover`; on CUDA :class:`CudaMover`: a copy stream and pinned staging, one tile ahead of the compute).
Used by :mod:`extension.stream`, which runs the passes; nothing here knows the decoder.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from hybrid_vae.policy import passes as P

if TYPE_CHECKING:
    import torch

__all__ = ["CudaMover", "DeferredMover", "Ledger", "Mover", "Region", "Store", "Ticket", "sweep"]

Region = tuple[int, int, int, int]  # y0, y1, x0, x1
T = TypeVar("T")
R = TypeVar("R")


# ---- accounting: what lives on the compute device ---------------------------------------------------


def _dispatch_mode() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class Ledger:
    """The decode's own accounting of the compute device (a context manager :func:`decode_steps` enters).

    Every tensor an operation creates during the decode is counted by the bytes of its storage while any
    tensor using that storage is alive, when it lives on the compute device and is not one of the
    whole-image buffers kept in host memory (on a CPU "device" the two share the physical memory, so the
    store registers its host buffers; tiles copied from them are new tensors and count as device memory).
    Tensors made before the decode (weights, the latent) are not counted. ``peak`` is the largest total
    seen between two operations; buffers inside one operation (convolution workspaces) are invisible.
    ``h2d``/``d2h`` are the bytes the store copied between host and device.

    Costs a Python call per operation: for tests and benchmarks, not for production decodes.
    """

    def __init__(self, device: str | torch.device) -> None:
        import torch

        self.device = torch.device(device)
        self.now = self.peak = self.h2d = self.d2h = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors]
        self._objects: dict[int, int] = {}  # id(tensor) -> data_ptr
        self._host: set[int] = set()
        self._mode: Any = None
        self._quiet = False

    def __enter__(self) -> Ledger:
        from torch.utils._pytree import tree_leaves

        ledger = self

        class _Mode(_dispatch_mode()):  # type: ignore[misc]
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                if not ledger._quiet:
                    ledger._see(out, tree_leaves((args, kwargs or {})))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._mode = None

    def _see(self, out: Any, inputs: list[Any]) -> None:
        import torch

        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if not outs:
            return
        given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.device == self.device}
        for t in outs:
            self._track(t, given)

    def _track(self, t: torch.Tensor, given: set[int]) -> None:
        """Count ``t`` if it is on the device: a new storage (not one of the operation's inputs') adds its
        bytes; a view or in-place result of a counted storage keeps it alive; one of anything else (weights,
        the latent, host buffers) is not the decode's."""
        if t.device != self.device or id(t) in self._objects:
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in self._host:
            return
        rec = self._storages.get(ptr)
        if rec is None:
            if ptr in given:
                return
            rec = self._storages[ptr] = [st.nbytes(), 0]
            self.now += rec[0]
            self.peak = max(self.peak, self.now)
        rec[1] += 1
        self._objects[id(t)] = ptr
        weakref.finalize(t, self._drop, id(t))

    def _drop(self, oid: int) -> None:
        ptr = self._objects.pop(oid, None)
        rec = self._storages.get(ptr) if ptr is not None else None
        if rec is None or ptr is None:
            return
        rec[1] -= 1
        if rec[1] <= 0:
            del self._storages[ptr]
            self.now -= rec[0]

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A whole-image buffer in host memory: allocated unseen, its storage never counted as device memory."""
        import torch

        self._quiet = True
        try:
            t = torch.empty(shape, dtype=dtype, device="cpu")
        finally:
            self._quiet = False
        self._host.add(t.untyped_storage().data_ptr())
        return t

    def unhost(self, t: torch.Tensor) -> None:
        self._host.discard(t.untyped_storage().data_ptr())


# ---- moving tiles between host memory and the device -----------------------------------------------


class Ticket:
    """A tile on its way to the device; :meth:`take` returns it once it may be used."""

    def __init__(self, tensor: torch.Tensor, event: Any = None, stream: Any = None) -> None:
        self.tensor, self.event, self.stream = tensor, event, stream

    def take(self) -> torch.Tensor:
        if self.event is not None:
            import torch

            cur = torch.cuda.current_stream(self.tensor.device)
            cur.wait_event(self.event)
            self.tensor.record_stream(cur)  # allocated on the copy stream, used on this one
            self.event = None
        return self.tensor


class Mover:
    """Plain copies: a host region becomes a new contiguous device tensor; a device tile is written into
    its place in host memory at once. Counts the bytes both ways."""

    def __init__(self, device: torch.device, ledger: Ledger | None) -> None:
        self.device, self.ledger = device, ledger
        self.h2d = self.d2h = 0

    def _count(self, up: int, down: int) -> None:
        self.h2d += up
        self.d2h += down
        if self.ledger is not None:
            self.ledger.h2d += up
            self.ledger.d2h += down

    def fetch(self, view: torch.Tensor) -> Ticket:
        import torch

        self._count(view.numel() * view.element_size(), 0)
        return Ticket(view.to(device=self.device, copy=True, memory_format=torch.contiguous_format))

    def put(self, view: torch.Tensor, tile: torch.Tensor) -> None:
        self._count(0, tile.numel() * tile.element_size())
        view.copy_(tile)

    def settle(self) -> None:
        """Finish the writes that are due (all but the most recent)."""

    def drain(self) -> None:
        """Finish every write (the end of a pass)."""


class DeferredMover(Mover):
    """Writes that land later: :meth:`put` of a subclass queues ``(view, staged, done)`` with :meth:`defer`;
    :meth:`settle` lands all but the most recent (waiting for ``done``, an event, when there is one) and
    :meth:`drain` all of them."""

    def __init__(self, device: torch.device, ledger: Ledger | None) -> None:
        super().__init__(device, ledger)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, Any]] = []

    def defer(self, view: torch.Tensor, staged: torch.Tensor, done: Any = None) -> None:
        self.pending.append((view, staged, done))

    def _finish(self, keep: int) -> None:
        while len(self.pending) > keep:
            view, staged, done = self.pending.pop(0)
            if done is not None:
                done.synchronize()
            view.copy_(staged)

    def settle(self) -> None:
        self._finish(1)

    def drain(self) -> None:
        self._finish(0)


class CudaMover(DeferredMover):
    """CUDA: copies on a separate stream through pinned staging buffers, so they overlap the compute.

    Host -> device: the tile's region is gathered on the CPU into a pinned buffer and copied on the copy
    stream (the pass asks for the next tile before it needs it). Device -> host: the copy stream waits for
    the tile, copies it into a pinned buffer, and the CPU scatters it into the whole-image buffer one tile
    later. PyTorch's pinned allocator keeps a staging buffer from reuse until its copy has finished; the
    whole-image buffers themselves stay in ordinary (pageable) memory: a strided tile of a pinned tensor
    would not be copied asynchronously anyway, and pinning gigabytes would lock them out of the OS.
    """

    def __init__(self, device: torch.device, ledger: Ledger | None) -> None:
        import torch

        super().__init__(device, ledger)
        self.stream = torch.cuda.Stream(device)

    def fetch(self, view: torch.Tensor) -> Ticket:
        import torch

        self._count(view.numel() * view.element_size(), 0)
        staged = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
        staged.copy_(view)
        with torch.cuda.stream(self.stream):
            tile = staged.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Ticket(tile, event, self.stream)

    def put(self, view: torch.Tensor, tile: torch.Tensor) -> None:
        import torch

        self._count(0, tile.numel() * tile.element_size())
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        staged = torch.empty(tile.shape, dtype=tile.dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            staged.copy_(tile, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        tile.record_stream(self.stream)  # the compute stream must not reuse it before the copy ran
        self.defer(view, staged, done)


def sweep(tiles: Sequence[T], request: Callable[[T], list[tuple[Ticket, R]]],
          body: Callable[[T, list[tuple[torch.Tensor, R]]], None], mover: Mover | None,
          after: Callable[[], None] | None = None) -> None:
    """Run ``body(tile, reads)`` over the ``tiles`` of one pass (``request(tile)``: its reads, each a ticket and
    what the body needs to place it; ``after``: called after each tile). The next tile's reads are requested
    before this tile is computed: on CUDA its upload is queued on the copy stream ahead of this tile's download, so
    it runs while this tile computes (one in-order copy stream: an upload queued after the download would wait for
    it, and the download waits for the compute). The reads come from earlier passes' buffers, never this one's;
    every write is in place when the pass returns (the next pass may read them on the CPU)."""
    nxt = request(tiles[0])
    for i, tile in enumerate(tiles):
        got = [(t.take(), r) for t, r in nxt]
        nxt = request(tiles[i + 1]) if i + 1 < len(tiles) else []
        body(tile, got)
        del got
        if mover is not None:
            mover.settle()
        if after is not None:
            after()
    if mover is not None:
        mover.drain()


# ---- the whole-image buffers ------------------------------------------------------------------------


class Store:
    """The schedule's buffers: on the compute device, or (ids in ``host``) in host memory."""

    def __init__(self, sched: P.Schedule, lh: int, lw: int, batch: int, device: torch.device, dtype: torch.dtype,
                 host: frozenset[int], mover: Mover, ledger: Ledger | None,
                 on_buffers: Callable[[int], None] | None) -> None:
        self.sched, self.lh, self.lw, self.batch = sched, lh, lw, batch
        self.device, self.dtype, self.host, self.mover = device, dtype, host, mover
        self.ledger, self.on_buffers = ledger, on_buffers
        self.bufs: dict[int, torch.Tensor] = {}
        self.item = 0

    def shape(self, bid: int) -> tuple[int, ...]:
        b = self.sched.buffers[bid]
        h, w = self.lh << b.level, self.lw << b.level
        if b.role == "tokens":
            return (h * w, b.channels)
        return (self.batch if b.role == "output" else 1, b.channels, h, w)

    def alloc(self, bid: int) -> None:
        import torch

        if bid not in self.host:
            t = torch.empty(self.shape(bid), dtype=self.dtype, device=self.device)
        elif self.ledger is not None:
            t = self.ledger.host_empty(self.shape(bid), self.dtype)
        else:
            t = torch.empty(self.shape(bid), dtype=self.dtype, device="cpu")
        self.bufs[bid] = t
        if self.on_buffers is not None:
            self.on_buffers(sum(b.untyped_storage().nbytes() for b in self.bufs.values()))

    def free(self, bid: int) -> None:
        t = self.bufs.pop(bid)
        if bid in self.host and self.ledger is not None:
            self.ledger.unhost(t)

    def _view(self, bid: int, channels: int, region: Region) -> torch.Tensor:
        t = self.bufs[bid]
        y0, y1, x0, x1 = region
        if self.sched.buffers[bid].role == "output":
            return t[self.item:self.item + 1, :channels, y0:y1, x0:x1]
        return t[:, :channels, y0:y1, x0:x1]

    def fetch(self, a: P.Access, core: Region) -> tuple[Ticket, Region]:
        """Tile ``core`` of ``a`` with ``a.halo`` pixels of context (clipped at the edges), and the core's
        place inside it."""
        y0, y1, x0, x1 = core
        h, w = self.bufs[a.buffer].shape[-2:]
        r = (max(0, y0 - a.halo), min(h, y1 + a.halo), max(0, x0 - a.halo), min(w, x1 + a.halo))
        view = self._view(a.buffer, a.channels, r)
        inner = (y0 - r[0], y1 - r[0], x0 - r[2], x1 - r[2])
        return (self.mover.fetch(view) if a.buffer in self.host else Ticket(view)), inner

    def fetch_rows(self, bid: int, start: int, stop: int) -> Ticket:
        """Rows ``start:stop`` of a tokens buffer."""
        view = self.bufs[bid][start:stop]
        return self.mover.fetch(view) if bid in self.host else Ticket(view)

    def write(self, bid: int, region: Region, tile: torch.Tensor) -> None:
        view = self._view(bid, tile.shape[1], region)
        if bid in self.host:
            self.mover.put(view, tile)
        else:
            view.copy_(tile)

    def write_rows(self, bid: int, start: int, rows: torch.Tensor) -> None:
        view = self.bufs[bid][start:start + rows.shape[0]]
        if bid in self.host:
            self.mover.put(view, rows)
        else:
            view.copy_(rows)
