"""SD.Next settings, the per-generation accordion, and reading SD.Next's model (family, custom VAE).

One settings section ``("hybrid_vae", "Hybrid VAE")``; every key starts with ``hybrid_vae_``. :data:`OPTIONS` is
the one table from option to engine: each row names the :class:`~policy.model.DecodeSettings` field its value
sets and the unit conversion (``hybrid_vae_reserve_mib`` x MiB -> ``reserve_bytes``), or the :class:`Config`
attribute of what only SD.Next has (on/off, token, profile path, decision log). The engine's model checks the
values (type and limits); there is no second settings model. Values are read at decode time with
:func:`read_config` (``shared.opts.secrets`` first, then ``shared.opts.data``, then the default), so a change
applies to the next generation without a restart. A value that cannot be used (a mode that does not exist, a
number out of range) is reported in the log and the image's infotext, naming the key, the value and the
default used instead; it never stops a generation. An endpoint list that cannot be parsed narrows where images
go: remote decode is off for every family until it is fixed (never the built-in endpoints instead). Every label
names the extension, so SD.Next's settings search (it matches the text shown for each setting) finds every
option with "hybrid".

``modules.*`` and ``gradio`` are imported inside the functions that need them: importing this module
outside SD.Next is cheap and safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hybrid_vae.extension.geometry import vae_geometry
from hybrid_vae.extension.latents import from_vae_space
from hybrid_vae.policy.errors import ProfileError
from hybrid_vae.policy.geometry import match_family
from hybrid_vae.policy.model import DecodeSettings, MiB, field_choices, field_expectation
from hybrid_vae.policy.profiles import Family, Profiles
from hybrid_vae.policy.trust import HF_TOKEN_POLICY
from pydantic import ValidationError

log = logging.getLogger("hybrid_vae.sdnext")

__all__ = ["GEN_MODES", "MODES", "NOT_EXPOSED", "OPTIONS", "PREFIX", "SECTION", "Config", "OptionSpec", "accordion_ui",
           "detect_custom", "detect_family", "from_vae_space", "hub_id", "options_markdown", "opts_getter",
           "parse_endpoints", "raw_decode", "read_config", "register_settings", "remote_off_reason", "resolve_settings",
           "token_endpoints"]

SECTION = ("hybrid_vae", "Hybrid VAE")
PREFIX = "hybrid_vae_"
MODES = field_choices("mode")
#: Choices of the per-generation override; the first one means "use the settings".
GEN_MODES = ("as in settings", *MODES)
#: Earlier name of ``GEN_MODES[0]`` (saved generation parameters, API calls): still means "use the settings".
GEN_MODE_LEGACY = "settings default"
SETTINGS_FILE = "SD.Next settings"
_ENGINE = DecodeSettings.model_fields  # the engine's defaults are the settings' defaults
RESERVE_MIB = int(_ENGINE["reserve_bytes"].default) // MiB
OVERLAP_PX = int(_ENGINE["tile_overlap_px"].default)
TILE_GROUPNORM = field_choices("tile_groupnorm")
DEADLINE_S = int(_ENGINE["remote_deadline_s"].default)
STOCK_VAE_SETTINGS = frozenset({"", "automatic", "none", "default"})
_TRUE_FALSE = {"true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One SD.Next option: key, default, label, gradio component name and its arguments, and where its value goes.

    Attributes:
        field: the :class:`DecodeSettings` field the value sets; the field's type and limits check it.
        scale: option unit -> field unit (``MiB``: the option is in MiB, the field in bytes).
        attr: instead of ``field``, the :class:`Config` attribute of a setting only SD.Next has.
        multiple_of: a number is rounded down to a multiple of this (the slider's step), with a note.
        secret: masked in SD.Next's UI and ``is_secret`` in /sdapi/v1/options-info.
    """

    key: str
    default: Any
    label: str
    component: str  # Checkbox | Radio | Textbox | Slider
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    secret: bool = False
    field: str | None = None
    attr: str | None = None
    scale: int = 1
    multiple_of: int | None = None


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(PREFIX + "enabled", True, "Hybrid VAE: choose full, tiled or remote decode for every image", "Checkbox",
               attr="enabled"),
    OptionSpec(PREFIX + "mode", "auto", "Hybrid VAE decode mode (auto: the fastest plan that fits the VRAM free now)",
               "Radio", {"choices": list(MODES)}, field="mode"),
    OptionSpec(PREFIX + "allow_remote", False, "Hybrid VAE: allow remote decode (privacy: the endpoint sees your images)",
               "Checkbox", field="allow_remote"),
    OptionSpec(PREFIX + "remote_custom_vae", False, "Hybrid VAE: allow remote decode for custom or fine-tuned VAEs "
               "(the endpoint decodes with its own VAE)", "Checkbox", field="allow_remote_custom_vae"),
    OptionSpec(PREFIX + "endpoints", "", "Hybrid VAE remote endpoints per family: family=url, ... "
               "(e.g. sdxl=https://host/decode; several with failover: sdxl=https://a/sdxl|https://b/sdxl; an invalid entry "
               "turns remote decode off until fixed)", "Textbox", field="endpoints"),
    OptionSpec(PREFIX + "builtin_endpoints", False, "Hybrid VAE: use the built-in Hugging Face endpoints for families "
               "without an endpoint above", "Checkbox", field="use_builtin_endpoints"),
    OptionSpec(PREFIX + "hf_token", "", "Hybrid VAE Hugging Face token for remote decode (kept in secrets.json, sent "
               "only to Hugging Face hosts over HTTPS)", "Textbox", {"type": "password"}, secret=True, attr="token"),
    OptionSpec(PREFIX + "reserve_mib", RESERVE_MIB, "Hybrid VAE VRAM reserve in MiB (left untouched by the decode)",
               "Slider", {"minimum": 0, "maximum": 8192, "step": 64}, field="reserve_bytes", scale=MiB),
    OptionSpec(PREFIX + "tile_groupnorm", "auto", "Hybrid VAE tiling: exact (same image as a full decode; whole-image "
               "buffers in host memory when VRAM is short), offload (exact, buffers in host memory as far as needed), "
               "local (least memory, tile colours drift) or auto (lossless first)", "Radio",
               {"choices": list(TILE_GROUPNORM)}, field="tile_groupnorm"),
    OptionSpec(PREFIX + "tile_overlap_px", OVERLAP_PX, "Hybrid VAE local tile overlap in pixels (more hides seams, "
               "costs time)", "Slider", {"minimum": 0, "maximum": 256, "step": 8}, field="tile_overlap_px", multiple_of=8),
    OptionSpec(PREFIX + "remote_deadline_s", DEADLINE_S, "Hybrid VAE remote decode deadline in seconds (then the next "
               "plan runs)", "Slider", {"minimum": 5, "maximum": 600, "step": 5}, field="remote_deadline_s"),
    OptionSpec(PREFIX + "profile_path", "", "Hybrid VAE profile YAML path (merged over the built-in profiles; see "
               "profiles/example-override.yaml)", "Textbox", attr="profile_path"),
    OptionSpec(PREFIX + "decision_log", True, "Hybrid VAE decision log: one INFO line per decode in SD.Next's log, "
               "and JSON lines in <data>/hybrid-vae/decisions.jsonl", "Checkbox", attr="decision_log"),
    OptionSpec(PREFIX + "learn", True, "Hybrid VAE: learn this GPU's decode times and memory peaks from each local "
               "decode (<data>/hybrid-vae/learned.json; a peak above the estimate, or an out-of-memory error, makes "
               "the next estimate larger; off: the profiles alone)", "Checkbox", attr="learn"),
)
#: The :class:`DecodeSettings` fields SD.Next has no option for, and why the engine's default serves there.
NOT_EXPOSED: Mapping[str, str] = {
    "exact_tolerance": "the engine's default (chosen on the simulated benchmark, docs/benchmarks.md)",
    "tight_speedup": "the engine's default (chosen on the simulated benchmark, docs/benchmarks.md)",
    "host_reserve_bytes": "the engine's default (2 GiB of host memory left to SD.Next and the system)",
    "min_tile_px": "the family's smallest tile from the profile (a profile YAML changes it)",
    "remote_format": "auto: raw or png by the measured bandwidth",
    "remote_quality": "lossless: an SD.Next image is never JPEG-compressed on the way",
    "allow_cpu": "on: the CPU is the last resort, so no image is lost",
    "generic_speed_factor": "the engine's default (a profile YAML gives a card its own numbers)",
    "video_host_output": "on: a video's finished frames go to host memory chunk by chunk (HunyuanVideo) or tile by "
                         "tile (Wan); SD.Next saves the video from there",
}


def register_settings() -> None:
    """Add the "Hybrid VAE" section to SD.Next's settings (call from ``script_callbacks.on_ui_settings``)."""
    from modules import shared

    try:
        import gradio as gr
    except ImportError:  # settings still work (API, config.json); only the widgets are plain
        gr = None
    for spec in OPTIONS:
        comp = getattr(gr, spec.component, None) if gr is not None else None
        extra = {"secret": True} if spec.secret else {}
        info = shared.OptionInfo(spec.default, spec.label, comp, dict(spec.args) or None, section=SECTION, **extra)
        if spec.secret:
            # SD.Next (058a7f0) accepts OptionInfo(secret=True) but does not keep it, while its options-info API
            # reports ``getattr(info, "secret", False)``: set it on the instance so the token reads as secret
            info.secret = True
        shared.opts.add_option(spec.key, info)


def opts_getter(opts: Any) -> Callable[[str, Any], Any]:
    """``get(key, default)`` over SD.Next's options: ``opts.secrets`` (keys ending ``_token``), then ``opts.data``."""

    def get(key: str, default: Any) -> Any:
        secrets = getattr(opts, "secrets", None)
        if isinstance(secrets, Mapping) and key in secrets:
            return secrets[key]
        data = getattr(opts, "data", None)
        return data.get(key, default) if isinstance(data, Mapping) else default

    return get


def _option_settings() -> DecodeSettings:
    """The engine settings of SD.Next's option defaults (built-in endpoints off, unlike the engine's default)."""
    return read_config(lambda _k, d: d, families=()).settings


@dataclasses.dataclass(frozen=True)
class Config:
    """The user's hybrid-vae settings as read at one decode.

    Attributes:
        settings: the engine's settings the ``hybrid_vae_*`` options give (:data:`OPTIONS`; default: the options'
            defaults).
        enabled, token, profile_path, decision_log, learn: what only SD.Next has (rows of :data:`OPTIONS` with
            ``attr``).
        problems: one line per value that could not be used (its default was used instead).
        endpoint_error: why the endpoint list could not be parsed; while set, remote decode is off for
            every family (a typo narrows where images go, never widens it).
    """

    settings: DecodeSettings = dataclasses.field(default_factory=_option_settings)
    enabled: bool = True
    token: str | None = None
    profile_path: str | None = None
    decision_log: bool = True
    learn: bool = True
    problems: tuple[str, ...] = ()
    endpoint_error: str | None = None


def parse_endpoints(text: str, families: Iterable[str]) -> dict[str, str]:
    """Parse ``"sdxl=https://a/decode, flux=http://127.0.0.1:8000/decode"`` strictly.

    Entries are separated by commas or new lines; empty entries are ignored. Several endpoints for one
    family are joined by ``|`` (``sd15=https://a/sd15|https://b/sd15``): a pool, tried best first with
    failover (``extension/endpoints.py``); the value keeps them joined.

    Raises:
        ProfileError: naming the setting, the entry and the fix (unknown family, missing ``=``,
            a URL that is not ``http(s)://host/...``, a family given twice).
    """
    known = sorted(families)
    out: dict[str, str] = {}
    key = PREFIX + "endpoints"
    for raw in str(text or "").replace("\n", ",").split(","):
        entry = raw.strip()
        if not entry:
            continue
        if "=" not in entry:
            raise ProfileError("expected family=url, e.g. sdxl=https://host/decode", file=SETTINGS_FILE, key_path=key,
                               value=entry)
        fam, url = (s.strip() for s in entry.split("=", 1))
        if fam not in known:
            raise ProfileError(f"unknown family {fam!r}; known families: {', '.join(known)}", file=SETTINGS_FILE,
                               key_path=key, value=entry)
        urls = [u.strip() for u in url.split("|")]
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in u):
                raise ProfileError("the URL must be http(s)://host[:port]/path without spaces (several: join them "
                                   "with |)", file=SETTINGS_FILE, key_path=key, value=entry)
        if len(set(urls)) != len(urls):
            raise ProfileError("a URL is listed twice for this family; give each once", file=SETTINGS_FILE,
                               key_path=key, value=entry)
        if fam in out:
            raise ProfileError(f"family {fam!r} is given twice; keep one endpoint per family", file=SETTINGS_FILE,
                               key_path=key, value=entry)
        out[fam] = "|".join(urls)
    return out


def _problem(spec: OptionSpec, raw: Any) -> str:
    """``hybrid_vae_mode='fastest' is not one of auto, full, tiled, remote; using auto``."""
    want = field_expectation(spec.field, spec.scale) if spec.field else "true/false"
    return f"{spec.key}={raw!r} is not {want}; using {spec.default}"


def _convert(spec: OptionSpec, raw: Any) -> Any:
    """The option's value in its own unit, typed like its default (SD.Next's API may send strings).

    Raises:
        ValueError: not true/false for a checkbox, not a finite number for a slider.
    """
    if isinstance(spec.default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE_FALSE:
            return _TRUE_FALSE[raw.strip().lower()]
        raise ValueError(raw)
    if isinstance(spec.default, str):
        text = str(raw or spec.default).strip()
        return text.lower() if spec.field else (text or None)  # a choice, or free text (token, path)
    try:
        num = float(raw)
    except (TypeError, ValueError):
        raise ValueError(raw) from None
    if not math.isfinite(num):
        raise ValueError(raw)
    whole = spec.field is not None and _ENGINE[spec.field].annotation is int
    return int(num) if whole else num


def read_config(get: Callable[[str, Any], Any], *, families: Iterable[str]) -> Config:
    """Read and check every ``hybrid_vae_*`` value through :data:`OPTIONS`; a bad value falls back to its default and
    is listed in ``problems`` (key, value, the default used)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    host: dict[str, Any] = {}
    raws: dict[str, tuple[OptionSpec, Any]] = {}
    endpoint_error = None
    for spec in OPTIONS:
        raw = get(spec.key, spec.default)
        if spec.field == "endpoints":
            try:
                values["endpoints"] = parse_endpoints(str(raw or ""), families)
            except ProfileError as exc:
                endpoint_error = str(exc)
                problems.append(f"{exc}; remote decode is off for every family until this setting is fixed")
            continue
        try:
            value = _convert(spec, raw)
        except ValueError:
            problems.append(_problem(spec, raw))
            value = spec.default
        if spec.multiple_of and value % spec.multiple_of:
            value -= value % spec.multiple_of
            problems.append(f"{spec.key}={raw!r} is not a multiple of {spec.multiple_of}; using {value}")
        if spec.field is None:
            host[str(spec.attr)] = value
        else:
            values[spec.field], raws[spec.field] = value * spec.scale, (spec, raw)
    try:
        settings = DecodeSettings.model_validate(values)
    except ValidationError as exc:  # out of the field's limits or choices: that option's default
        for field in dict.fromkeys(str(e["loc"][0]) for e in exc.errors() if e["loc"]):
            spec, raw = raws[field]
            problems.append(_problem(spec, raw))
            values[field] = spec.default * spec.scale
        settings = DecodeSettings.model_validate(values)
    return Config(settings=settings, problems=tuple(problems), endpoint_error=endpoint_error, **host)


def resolve_settings(cfg: Config, *, override: str | None = None, vae_type: str = "Full") -> tuple[DecodeSettings, list[str]]:
    """The :class:`DecodeSettings` for one decode, and notes for the infotext.

    Args:
        cfg: the settings read by :func:`read_config`.
        override: the accordion's choice for this generation (``GEN_MODES[0]``, its legacy name or ``None``: none).
        vae_type: SD.Next's ``vae_type``; ``"Remote"`` means "remote preferred" (when remote is allowed).

    Remote decode is allowed only when the user allowed it and the endpoint list parsed (``endpoint_error``
    unset); the built-in endpoints only when their own setting is on.
    """
    notes: list[str] = []
    mode: str = cfg.settings.mode
    allow_remote = cfg.settings.allow_remote and cfg.endpoint_error is None
    if override and override not in (GEN_MODES[0], GEN_MODE_LEGACY):
        if override in MODES:
            mode = override
        else:
            notes.append(f"unknown per-generation mode {override!r} ignored")
    if vae_type == "Remote":
        if allow_remote:
            mode = "remote"
        else:
            notes.append("SD.Next VAE type Remote ignored: " + remote_off_reason(cfg))
    return cfg.settings.updated(mode=mode, allow_remote=allow_remote), notes


def remote_off_reason(cfg: Config, *, detail: bool = True) -> str:
    """Why remote decode cannot happen with these settings ("" when it can); ``detail=False`` leaves out the
    endpoint setting's error text (the infotext lists it once as an ignored setting)."""
    if cfg.endpoint_error is not None:
        return "remote decode is off until the endpoint setting is fixed" + (f" ({cfg.endpoint_error})" if detail else "")
    if not cfg.settings.allow_remote:
        return "remote decode is off (Settings > Hybrid VAE: allow remote decode)"
    if not cfg.settings.endpoints and not cfg.settings.use_builtin_endpoints:
        return "no remote endpoint is set (Settings > Hybrid VAE: endpoints, or the built-in endpoints)"
    return ""


def options_markdown() -> str:
    """The table of docs/configuration.md: each SD.Next option, the field it sets and how, then the fields it leaves."""
    rows = ["| SD.Next option | Default | Sets | Conversion |", "|---|---|---|---|"]
    for o in OPTIONS:
        target = f"`DecodeSettings.{o.field}`" if o.field else f"SD.Next only (`Config.{o.attr}`)"
        how = {MiB: "x 1 MiB (MiB -> bytes)"}.get(o.scale, "as is") if o.field != "endpoints" else \
            "`family=url, ...` -> `{family: url}` (`parse_endpoints`)"
        if o.multiple_of:
            how += f", rounded down to a multiple of {o.multiple_of}"
        rows.append(f"| `{o.key}` | `{o.default!r}` | {target} | {how} |")
    rows += ["", "| `DecodeSettings` field without an SD.Next option | What SD.Next uses |", "|---|---|"]
    rows += [f"| `{f}` | {why} |" for f, why in NOT_EXPOSED.items()]
    return "\n".join(rows) + "\n"


def token_endpoints(urls: Iterable[str]) -> list[str]:
    """The endpoints among ``urls`` that may receive the Hugging Face token (:data:`policy.trust.HF_TOKEN_POLICY`)."""
    return [u for u in urls if HF_TOKEN_POLICY.allows(u)]


def accordion_hint(mode: str | None = None) -> str:
    """The accordion's line under the mode choice: what "remote" would do with the settings as they are now."""
    from hybrid_vae.extension.sdnext import current_runtime

    try:
        rt = current_runtime()
        if rt is None:
            return ""
        cfg = rt.config()[0]
    except Exception:  # settings unreadable: a hint is not worth an error (the decode reports it)
        log.debug("hybrid-vae: accordion hint unavailable", exc_info=True)
        return ""
    off = remote_off_reason(cfg)
    if not off:
        return "Remote decode is allowed: a remote plan is used when it is estimated faster or nothing local fits."
    text = f"Remote would not happen: {off}."
    return f"**{text}** This generation decodes locally." if mode == "remote" else text


def accordion_ui(is_img2img: bool) -> list[Any]:
    """The AlwaysVisible accordion: the decode mode for one generation, and a line saying when remote cannot happen
    (refreshed when the choice changes, so it reflects the settings of that moment)."""
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion("Hybrid VAE", open=False, elem_id=f"hybrid_vae_{tab}"):
        mode = gr.Radio(label="Hybrid VAE decode mode for this generation", choices=list(GEN_MODES), value=GEN_MODES[0],
                        elem_id=f"hybrid_vae_{tab}_mode")
        hint = gr.Markdown(accordion_hint(), elem_id=f"hybrid_vae_{tab}_hint")
        mode.change(fn=accordion_hint, inputs=[mode], outputs=[hint])
    return [mode]


# ---- reading SD.Next's model -----------------------------------------------------------------------
def detect_family(vae: Any, profiles: Profiles) -> tuple[str | None, str]:
    """The family key whose whole geometry (class, latent channels, spatial/temporal compression, scaling/shift
    or mean/std) matches ``vae``'s, or None and why (:func:`policy.geometry.match_family`).

    A VAE of a class the engine decodes that matches no family is still decoded by the engine, locally only
    (:func:`extension.geometry.resolve_family`); other classes stay SD.Next's.
    """
    geom = vae_geometry(vae)
    if geom is None:
        return None, f"{type(vae).__name__} has no VAE config hybrid-vae can read"
    return match_family(geom, profiles)


def hub_id(name: str) -> str:
    """``.../models--org--name/snapshots/x/vae`` -> ``org/name``; other strings unchanged (no trailing ``/vae``)."""
    s = name.replace("\\", "/").rstrip("/")
    if "models--" in s:
        s = s.split("models--", 1)[1].split("/", 1)[0].replace("--", "/")
    elif s.endswith("/vae"):
        s = s[: -len("/vae")]
    return s


def detect_custom(vae: Any, model: Any, fam: Family, *, sd_vae: Any = None,
                  loaded_vae_file: Any = None) -> tuple[bool, str | None, str]:
    """``(custom, vae_id, why)``: is ``vae`` something other than the family's stock VAE (``fam.vae_ids``)?

    A VAE chosen in SD.Next's VAE setting or loaded from a file is custom; so is one whose checkpoint
    name (the VAE's or the pipeline's ``_name_or_path``, Hugging Face cache paths understood) is not a
    stock id: remote endpoints serve stock VAEs only, so unknown counts as custom.
    """
    if str(sd_vae or "").strip().lower() not in STOCK_VAE_SETTINGS:
        return True, str(sd_vae), f"SD.Next VAE setting selects {sd_vae}"
    if loaded_vae_file:
        return True, Path(str(loaded_vae_file)).name, f"VAE loaded from {loaded_vae_file}"
    names = []
    for obj in (vae, model):
        cfg = getattr(obj, "config", None)
        n = (cfg.get("_name_or_path") if isinstance(cfg, Mapping) else getattr(cfg, "_name_or_path", None)) if cfg else None
        if n:
            names.append(str(n))
    stock = {v.lower() for v in fam.vae_ids}
    for n in names:
        hub = hub_id(n).lower()
        if hub in stock or any(hub.endswith("/" + s) for s in stock):
            return False, hub_id(n), "stock VAE"
    first = names[0] if names else None
    return True, first, "not a known stock VAE checkpoint" if first else "VAE checkpoint unknown"


@contextlib.contextmanager
def raw_decode(vae: Any) -> Iterator[None]:
    """While the engine runs, ``vae.decode`` is the class's own method: SD.Next's ``sd_hijack_vae`` (which
    swallows exceptions, out-of-memory included) and our own wrapper are out of the way."""
    meth = getattr(type(vae), "decode", None)
    if meth is None:
        yield
        return
    had = "decode" in vae.__dict__
    saved = vae.__dict__.get("decode")
    vae.__dict__["decode"] = meth.__get__(vae, type(vae))
    try:
        yield
    finally:
        if had:
            vae.__dict__["decode"] = saved
        else:
            vae.__dict__.pop("decode", None)
