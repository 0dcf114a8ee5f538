"""Why a decision chose its plan, as data, and the one renderer that turns it into words.

:func:`policy.decide.decide` states *why* as a :data:`ReasonCode` and a frozen mapping of the numbers and labels
behind it (:class:`Reason`); :attr:`Decision.reason <policy.model.Decision.reason>` (the sentence ``explain``,
the decision log and the reports show) and :attr:`Decision.summary <policy.model.Decision.summary>` (the
infotext clause) are rendered here from that data, and nowhere else. Code that needs to know why reads the code
and the parameters, never the prose::

    # sdxl 1024x1024 on an RTX 3070 with 1.0 GiB free and 23 GiB of host memory (README's explain sample)
    d = decide(job, gpu, profiles, settings)
    d.reason_code                 # "tiled_full_too_big"
    d.reason_params["tiles"]      # "exact_host"
    d.reason_params["full_need"]  # 5137573664 (bytes)
    d.reason                      # "tiled 256px exact+host: needs 0.85 GiB of 0.94 GiB; full needs 4.78 GiB > ..."

Codes (the chosen plan's primary reason; :data:`REASON_CODES` lists them):

- ``full_fits``: a full decode of the whole batch fits the budget.
- ``batch_sliced``: the batch does not fit at once; full decodes one item at a time.
- ``tiled_full_too_big``: tiles, because a full decode needs more than the budget.
- ``tiled_faster``: tiles although full fits: estimated faster.
- ``tiled_requested``: tiles although full fits: ``mode="tiled"``.
- ``squeezed``: nothing fits the budget; the smallest GPU plan fits inside the reserve.
- ``tight_faster``: a lossless GPU plan that fits what is available but not the budget goes first, estimated
  ``tight_speedup`` (1.25x) or more faster than the plan the budget chose (``behind_label``, ``behind_seconds``),
  which goes right after it: an OOM there costs one attempt.
- ``near_fit``: nothing fits what is available; the smallest GPU plan is estimated within ``near_fit`` (1.25x) of it
  and goes first because the CPU would take ``cpu_seconds`` (10x or more), does not fit host memory
  (``cpu_host``), or is off; an OOM there costs one attempt, then the CPU plans follow.
- ``remote_faster``: remote, estimated faster than the best local plan.
- ``remote_no_gpu`` / ``remote_nothing_fits``: remote, with no GPU / with no local plan that fits.
- ``cpu_no_gpu`` / ``cpu_nothing_fits``: the CPU, with no GPU / with no GPU plan that fits, and remote unusable.

Secondary codes live in the parameters: ``unmet_request`` (``full`` / ``tiled`` / ``remote``: the requested
mode could not run, :data:`UnmetRequest`), ``tiles`` (why exact or local tiles, :data:`TileNote`),
``remote_code`` (why remote is or is not a candidate, :data:`RemoteCode`) with ``remote_identity``
(:data:`IdentityGate`), ``inferred`` (the family was inferred from the VAE's config), ``below_tile_px`` (the
chosen plan's tile is below the family's smallest, this many px: a last-resort tile), and the memory numbers
(bytes): ``need``, ``full_need``, ``budget`` (may be negative: memory under the reserve), ``available``,
``free``, ``cache``, ``reserve``. :func:`reason_text` and :func:`summary_text` render; every comparison they
write holds for the numbers given (tests/test_reason_text.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

from hybrid_vae.policy.gpu import format_gib as _gib

ReasonCode = Literal["full_fits", "batch_sliced", "tiled_full_too_big", "tiled_faster", "tiled_requested",
                     "squeezed", "tight_faster", "near_fit", "remote_faster", "remote_no_gpu", "remote_nothing_fits",
                     "cpu_no_gpu", "cpu_nothing_fits"]
#: Every :data:`ReasonCode`, in the order of the module docstring.
REASON_CODES: tuple[ReasonCode, ...] = get_args(ReasonCode)
#: ``unmet_request``: the mode the settings asked for, which could not run (then the sentence starts with why).
UnmetRequest = Literal["full", "tiled", "remote"]
#: ``tiles``: ``exact_host`` (exact tiles, buffers partly in host memory), ``exact_video_host`` (exact HunyuanVideo
#: tiles, the whole-video buffers in host memory but those the budget keeps on the GPU, copies overlapped),
#: ``exact`` (output equals a full decode), ``local_lossless_slower`` (a lossless plan fits but is over
#: ``exact_tolerance`` slower), ``local_no_lossless`` (no lossless plan fits); absent for tiles with nothing to say
#: (video, no exact model).
TileNote = Literal["exact_host", "exact_video_host", "exact", "local_lossless_slower", "local_no_lossless"]
#: ``remote_code``: why remote is (``configured``, ``pool``, ``builtin``) or is not (the rest) a candidate.
RemoteCode = Literal["remote_off", "inferred_family", "custom_vae", "configured", "pool", "builtin", "no_endpoint",
                     "unavailable"]
#: ``remote_identity``: what a canary verdict did to the endpoint: ``same`` (allowed), ``allowed`` (another or
#: unverified VAE, allowed by ``allow_remote_custom_vae``), ``refused``.
IdentityGate = Literal["same", "allowed", "refused"]
ReasonValue = int | float | str | bool | None


class Params(Mapping[str, ReasonValue]):
    """Reason parameters: a read-only mapping (no item assignment) that pickles and copies like a dict, unlike
    ``types.MappingProxyType`` (a decision may cross a process boundary). None values are left out."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, ReasonValue] | None = None) -> None:
        self._items: dict[str, ReasonValue] = {k: v for k, v in (items or {}).items() if v is not None}

    def __getitem__(self, key: str) -> ReasonValue:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Params({self._items!r})"

    def __reduce__(self) -> tuple[type[Params], tuple[dict[str, ReasonValue]]]:
        return Params, (self._items,)


@dataclasses.dataclass(frozen=True)
class Reason:
    """A reason code and its parameters (read-only; None values are left out)."""

    code: ReasonCode
    params: Mapping[str, ReasonValue]

    @classmethod
    def make(cls, code: ReasonCode, params: Mapping[str, ReasonValue]) -> Reason:
        return cls(code, Params(params))


def _s(p: Mapping[str, ReasonValue], key: str, default: str = "") -> str:
    v = p.get(key)
    return default if v is None else str(v)


def _b(p: Mapping[str, ReasonValue], key: str) -> int:
    v = p.get(key)
    return int(v) if isinstance(v, (int, float)) else 0


def _f(p: Mapping[str, ReasonValue], key: str) -> float:
    v = p.get(key)
    return float(v) if isinstance(v, (int, float)) else 0.0


# ---- remote ----------------------------------------------------------------------------------------------------

def remote_text(p: Mapping[str, ReasonValue], *, head: bool = False) -> str:
    """Why remote is or is not a candidate, from the ``remote_*`` parameters: ``configured endpoint``,
    ``custom VAE my/vae differs from the endpoint's; remote not allowed for it``, ... ``head=True``: only the
    first clause (``custom VAE my/vae differs from the endpoint's``), for a short note."""
    code = p.get("remote_code")
    ident = p.get("remote_identity")
    itext = _s(p, "remote_identity_text")
    if ident == "refused":
        parts = [itext, "remote not used for it (allow_remote_custom_vae overrides)"]
    else:
        parts = _route_parts(code, p)
        if code == "unavailable":  # the circuit is what stops it, whatever the canary said
            pass
        elif ident == "same":
            parts.append(itext)
        elif ident == "allowed":
            parts.append(f"{itext}, allowed by allow_remote_custom_vae")
    return parts[0] if head else "; ".join(parts)


def _route_parts(code: ReasonValue, p: Mapping[str, ReasonValue]) -> list[str]:
    if code == "remote_off":
        return ["remote decode is off (opt-in: the endpoint sees the images)"]
    if code == "inferred_family":
        return ["never remote for a VAE whose geometry matches no family"]
    if code == "custom_vae":
        return [f"custom VAE {_s(p, 'remote_vae_id')} differs from the endpoint's".replace("  ", " "),
                "remote not allowed for it"]
    if code == "configured":
        return ["configured endpoint"]
    if code == "pool":
        return [f"configured pool of {_b(p, 'remote_pool_size')} endpoints (best first, failover)"]
    if code == "builtin":
        return [f"built-in {_s(p, 'remote_provider')} endpoint serving {_s(p, 'remote_vae')}"]
    if code == "unavailable":
        return [f"endpoint {_s(p, 'remote_url')} unavailable ({_s(p, 'remote_note') or 'circuit open'})"]
    return [f"no endpoint serves {_s(p, 'family')}",
            "set one in settings (e.g. your own `hybrid-vae serve`)"]


# ---- the sentence ----------------------------------------------------------------------------------------------

def request_text(p: Mapping[str, ReasonValue]) -> str | None:
    """The clause saying why the requested mode did not run, e.g. ``tiled requested but no tile fits`` (None when
    it ran or none was requested). ``remote requested but ...`` names only the first clause of remote's reason."""
    asked = p.get("unmet_request")
    if asked == "full":
        return f"full requested but needs {_gib(_b(p, 'full_need'))} > {_gib(max(0, _b(p, 'budget')))}"
    if asked == "tiled":
        return "tiled requested but no tile fits"
    if asked == "remote":
        return f"remote requested but {remote_text(p, head=True)}"
    return None


def _prefix(p: Mapping[str, ReasonValue]) -> str:
    asked = p.get("unmet_request")
    if asked == "remote":
        return f"remote requested but {remote_text(p)}; "
    text = request_text(p)
    return f"{text}; " if text else ""


def _tiles_text(p: Mapping[str, ReasonValue]) -> str:
    note = p.get("tiles")
    if note == "exact_host":
        alone = p.get("exact_gpu_need")
        gpu_alone = f"exact tiling on the GPU alone needs {_gib(_b(p, 'exact_gpu_need'))}; " if alone is not None else ""
        return (f"; {gpu_alone}{_gib(_b(p, 'host_bytes'))} of whole-image buffers in host memory, "
                f"{_b(p, 'transfer_bytes') / 1e9:.1f} GB copied (est. {_f(p, 'transfer_seconds'):.2f} s, overlapped); "
                f"output equals a full decode")
    if note == "exact_video_host":
        gpu = (f" (up to {_gib(_b(p, 'gpu_buffer_budget'))} of them on the GPU)"
               if _b(p, "gpu_buffer_budget") else "")
        return (f"; {_gib(_b(p, 'host_bytes'))} of whole-video buffers in host memory{gpu}, "
                f"{_b(p, 'transfer_bytes') / 1e9:.1f} GB copied (est. {_f(p, 'transfer_seconds'):.2f} s, overlapped); "
                f"frames equal a full decode")
    if note == "exact":
        return "; output equals a full decode"
    if note == "local_lossless_slower":
        return (f"; {_s(p, 'lossless_label')} fits but is estimated {_f(p, 'lossless_seconds'):.2f} s, over "
                f"{_f(p, 'exact_tolerance'):g}x this plan's, so tile colours may differ from a full decode")
    if note == "local_no_lossless":
        host = f" with {_gib(_b(p, 'exact_host_bytes'))} in host memory" if _b(p, "exact_host_bytes") else ""
        return (f"; no lossless plan fits: exact tiling needs {_gib(_b(p, 'exact_need'))}{host}, so tile "
                f"colours may differ from a full decode")
    return ""


def _core(code: ReasonCode, p: Mapping[str, ReasonValue]) -> str:
    need, full_need, budget = _b(p, "need"), _b(p, "full_need"), max(0, _b(p, "budget"))
    label = _s(p, "label")
    if code == "squeezed":
        return (f"squeezed into the reserve: {label} needs {_gib(need)} > {_gib(budget)} budget, "
                f"<= {_gib(_b(p, 'available'))} available; nothing fits the budget")
    if code == "tight_faster":
        return (f"into the reserve: {label} needs {_gib(need)} > {_gib(budget)} budget, "
                f"<= {_gib(_b(p, 'available'))} available; est. {_f(p, 'seconds'):.2f} s, over "
                f"{_f(p, 'tight_speedup'):g}x faster than {_s(p, 'behind_label')} ({_f(p, 'behind_seconds'):.2f} s), "
                "which goes next" + _tiles_text(p))
    if code == "near_fit":
        if p.get("cpu_host") is not None:
            cpu = f"the CPU needs {_gib(_b(p, 'cpu_host'))} of host memory, more than is free"
        elif p.get("cpu_seconds") is not None:
            cpu = f"the CPU would take {_f(p, 'cpu_seconds'):.0f} s against {_f(p, 'seconds'):.1f} s"
        else:
            cpu = "the CPU is off (allow_cpu)"
        return (f"nearly fits: {label} needs {_gib(need)} > {_gib(_b(p, 'available'))} available (within "
                f"{_f(p, 'near_fit'):g}x of it) and nothing fits; {cpu}, so the GPU is tried first")
    if code == "full_fits":
        return f"full fits: needs {_gib(need)} of {_gib(budget)}"
    if code == "batch_sliced":
        return f"batch of {_b(p, 'batch')} needs {_gib(full_need)} > {_gib(budget)}; one at a time needs {_gib(need)}"
    if code in ("tiled_requested", "tiled_faster"):
        why = "requested" if code == "tiled_requested" else "estimated faster than full"
        return (f"{label} {why}: needs {_gib(need)} of {_gib(budget)}; full would fit too ({_gib(full_need)})"
                + _tiles_text(p))
    if code == "tiled_full_too_big":
        return (f"{label}: needs {_gib(need)} of {_gib(budget)}; full needs {_gib(full_need)} > {_gib(budget)}"
                + _tiles_text(p))
    if code in ("remote_faster", "remote_no_gpu", "remote_nothing_fits"):
        vs = (f"faster than {_s(p, 'local_label')} ({_f(p, 'local_seconds'):.2f} s)" if code == "remote_faster"
              else "no GPU" if code == "remote_no_gpu" else "nothing local fits" + (f" {_gib(budget)}" if budget > 0 else ""))
        return f"remote {_s(p, 'format')} est. {_f(p, 'seconds'):.2f} s, {vs}"
    why = "no GPU" if code == "cpu_no_gpu" else f"no GPU plan fits {_gib(_b(p, 'available'))}"
    if p.get("local_tiles_off") is not None:
        why += f" (local GPU tiles are off: tile_groupnorm={_s(p, 'local_tiles_off')})"
    if p.get("unmet_request") == "remote":  # the "remote requested but ..." prefix said why already
        return f"{label}: {why}"
    return f"{label}: {why}; remote: {'failed before' if p.get('remote_planned') else remote_text(p)}"


def fragmented_text(nbytes: int) -> str:
    """The clause naming the torch cache's fragmented part the engine does not count ("" when there is none)."""
    return f"; {_gib(nbytes)} more fragmented, not counted" if nbytes else ""


def _memory(p: Mapping[str, ReasonValue]) -> str:
    if not p.get("on_gpu"):
        return f" [no GPU: {_s(p, 'gpu_note')}]"
    available, budget = _gib(_b(p, "available")), _b(p, "budget")
    have = f"{available} available ({_gib(_b(p, 'free'))} free + {_gib(_b(p, 'cache'))} cache" \
           f"{fragmented_text(_b(p, 'fragmented'))})"
    if budget < 0:  # said as what it is, never as a negative budget
        return f" [{have} is under the {_gib(_b(p, 'reserve'))} reserve: no budget]"
    return f" [{have} - {_gib(_b(p, 'reserve'))} reserve = {_gib(budget)} budget]"


def reason_text(code: ReasonCode, params: Mapping[str, ReasonValue]) -> str:
    """The full reason: why the requested mode did not run (if so), why this plan with the memory arithmetic, what
    refused remote, the inferred family, and the memory line, e.g. ``full fits: needs 1.37 GiB of 7.01 GiB [7.07
    GiB available (7.07 GiB free + 0.00 GiB cache) - 0.06 GiB reserve = 7.01 GiB budget]``."""
    p = params
    text = _prefix(p) + _core(code, p)
    if p.get("remote_identity") == "refused" and not code.startswith("cpu_"):  # the cpu reason names it already
        text += f"; remote: {remote_text(p)}"
    if p.get("below_tile_px"):
        text += (f"; {_s(p, 'label').split(',')[0]} is below the family's smallest tile ({_b(p, 'below_tile_px')} px), "
                 "tried only because nothing larger fits: its estimate extrapolates, and more tiles mean more seams")
    if p.get("inferred"):
        text += f"; {_s(p, 'inferred')}"
    return text + _memory(p)


def summary_text(code: ReasonCode, params: Mapping[str, ReasonValue]) -> str:
    """The infotext clause when the chosen plan runs: short, and every comparison it states holds, e.g.
    ``tiled 384px/64, 0.75 GiB budget < 4.79 GiB full``."""
    p = params
    need, full_need, budget = _b(p, "need"), _b(p, "full_need"), max(0, _b(p, "budget"))
    label = _s(p, "label")
    if code == "squeezed":
        text = f"{label}, squeezed into the reserve: {_gib(need)} > {_gib(budget)} budget"
    elif code == "tight_faster":
        text = f"{label}, into the reserve: {_gib(need)} > {_gib(budget)} budget, faster than {_s(p, 'behind_label')}"
    elif code == "near_fit":
        text = f"{label}, nearly fits: {_gib(need)} > {_gib(_b(p, 'available'))} available"
    elif code in ("full_fits", "batch_sliced"):
        text = f"{label}, {_gib(need)} of {_gib(budget)} budget"
    elif code == "tiled_full_too_big":
        text = f"{label}, {_gib(budget)} budget < {_gib(full_need)} full"
    elif code in ("tiled_requested", "tiled_faster"):
        how = "as requested" if code == "tiled_requested" else "faster than full"
        text = f"{label}, {how}, {_gib(need)} of {_gib(budget)} budget"
    elif code.startswith("remote_"):
        text = f"remote {_s(p, 'format')}"
    else:
        text = f"{label}, " + ("no GPU" if code == "cpu_no_gpu" else f"no GPU plan fits {_gib(_b(p, 'available'))} available")
    if p.get("below_tile_px"):
        text += ", last-resort tile"
    if p.get("inferred"):
        text += ", VAE matches no family: local only"
    return text
