"""A VAE object's geometry and family, for every entry point (SD.Next, drop-in, CLI, orchestrator).

The matching itself is pure and lives in :mod:`policy.geometry`; this module only reads a VAE object
(its class name, ``config`` and decoder parameter count) and adds the local-only ``unmatched`` family to the
profiles when a VAE's geometry matches no family.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from hybrid_vae.policy.errors import LatentError, ProfileError
from hybrid_vae.policy.geometry import (
    UNMATCHED,
    VaeGeometry,
    geometry_from_config,
    match_family,
    structure_differences,
    unmatched_family,
    with_family,
)
from hybrid_vae.policy.profiles import Profiles

log = logging.getLogger("hybrid_vae.geometry")

__all__ = ["UNMATCHED", "resolve_family", "vae_geometry"]


def vae_geometry(vae: Any) -> VaeGeometry | None:
    """The geometry of a diffusers-like VAE (``vae.config`` with ``latent_channels`` or ``z_dim``), else None."""
    cfg = getattr(vae, "config", None)
    if cfg is None:
        return None
    has = (lambda k: k in cfg) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None) is not None)
    if not (has("latent_channels") or has("z_dim")):
        return None
    params = None
    decoder = getattr(vae, "decoder", None)
    if decoder is not None and callable(getattr(decoder, "parameters", None)):
        try:
            params = sum(int(p.numel()) for p in decoder.parameters())
        except (TypeError, AttributeError, RuntimeError):
            params = None
    return geometry_from_config(type(vae).__name__, cfg, decoder_params=params or None)


def resolve_family(vae: Any, profiles: Profiles, family: str | None = None) -> tuple[str, Profiles, str]:
    """``(family key, profiles, how)`` for decoding with ``vae``.

    - ``family=None``: the family whose whole geometry matches the VAE's (:func:`policy.geometry.match_family`);
    - a known ``family``: kept; a VAE of a class the engine decodes whose structure (class, channels,
      spatial/temporal compression) contradicts it is an error (the latents cannot be that family's);
    - no match: :data:`UNMATCHED`, a local-only family scaled from the VAE's config, added to the returned
      profiles (``how`` says why).

    Raises:
        ProfileError: no family given and the VAE has no readable geometry, or its class is one the engine
            does not decode; an unknown ``family`` (other than ``unmatched``).
        LatentError: ``family`` contradicts the VAE's structure.
    """
    if family == UNMATCHED and UNMATCHED in profiles.families:
        return family, profiles, "given"  # resolved before (the drop-in adjusts its normalisation)
    geom = vae_geometry(vae)
    if family is not None and family != UNMATCHED:
        fam = profiles.family(family)  # raises for an unknown key
        if geom is None or geom.architecture is None:
            return family, profiles, "given"
        diffs = structure_differences(geom, fam)
        if diffs:
            raise LatentError(f"family={family!r}, but the VAE is {geom.describe()} ({family} has {', '.join(diffs)}); "
                              "leave the family unset so the VAE's own geometry decides, or pass the matching VAE")
        return family, profiles, "given"
    if geom is None:
        raise ProfileError("cannot tell the family: the VAE has no config with latent_channels; pass the family",
                           key_path="family", value=family)
    key, why = match_family(geom, profiles)
    if key is not None:
        return key, profiles, f"VAE geometry ({geom.describe()})"
    fam_u = unmatched_family(geom, profiles, why)
    if fam_u is None:
        raise ProfileError(f"{why}; hybrid-vae cannot decode it", key_path="family", value=family)
    return UNMATCHED, with_family(profiles, UNMATCHED, fam_u), why
