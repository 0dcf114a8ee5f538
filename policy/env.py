"""Every ``HYBRID_VAE_*`` environment variable, read in one place.

:func:`read_env` takes a mapping (default ``os.environ``, read at the call, never at import) and returns a
frozen :class:`Env`; every module that honours a variable calls it where the value is needed, so a
variable set after import (``monkeypatch.setenv`` in the tests, ``export`` before a new decode in a
long-running UI) applies to the next call. An empty or all-blank value counts as unset. A value that
cannot be used raises :class:`~policy.errors.EnvError`, one line naming the variable, the value and the
fix::

    from hybrid_vae.policy.env import read_env
    env = read_env()                      # or read_env({"HYBRID_VAE_STRICT": "1"})
    env.strict, env.profile               # False, None

The table in docs/configuration.md is :func:`markdown_table` (tests/test_env.py keeps them equal).
``HYBRID_VAE_ROOT`` is the one variable read elsewhere: ``extension/comfyui/__init__.py`` reads it to find
this package before it can be imported; it is listed here so the table is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hybrid_vae.policy.errors import EnvError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["FALSE", "PREFIX", "TRUE", "Env", "env_name", "markdown_table", "read_env"]

PREFIX = "HYBRID_VAE_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def _var(name: str, description: str, *, kind: str, unset: str, read_by: str, default: Any = None) -> Any:
    """A field read from ``HYBRID_VAE_<name>``: its description, type shown in the table (``kind``), what
    happens when it is unset, and the code that reads it."""
    return Field(default, alias=PREFIX + name, description=description,
                 json_schema_extra={"kind": kind, "unset": unset, "read_by": read_by})


class Env(BaseModel):
    """The ``HYBRID_VAE_*`` variables as read at one call (fields by their Python name; the variable is the alias)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    simulate_gpu: str | None = _var("SIMULATE_GPU", "Pretend to be this GPU instead of probing (tests, benchmarks, explain on a laptop): name=NVIDIA GeForce RTX 3070,free_gib=1.0[,total_gib=8][,host_gib=12]. Every decision says it is simulated.", kind="spec", unset="probe the real device", read_by="policy.gpu.probe")
    profile: str | None = _var("PROFILE", "Profile YAML merged key by key over the built-in profiles (a path or flag given explicitly wins).", kind="path", unset="built-in profiles only", read_by="policy.profiles.load_profiles, ProfileStore")
    learned: str | None = _var("LEARNED", "File of the learned timing and peak factors (explain --learned, calibrate --reset-learned).", kind="path", unset="`<user cache>/hybrid-vae/learned.json`", read_by="policy.learned.default_path")
    identity: str | None = _var("IDENTITY", "File of the endpoint identity verdicts (canary decodes: does an endpoint serve this VAE?).", kind="path", unset="`<user cache>/hybrid-vae/identity.json`", read_by="extension.identity.IdentityStore")
    strict: bool = _var("STRICT", "A programming error inside a plan (TypeError, AttributeError, ...) is raised instead of being reported and decoded by the next plan. For tests and development, never for users.", kind="bool", unset="off (fall back and report)", read_by="extension.orchestrator.HybridDecoder", default=False)
    token: str | None = _var("TOKEN", "Bearer token sent to remote endpoints (hybrid-vae decode --endpoint, the ComfyUI node); only to the endpoints configured for the decode, over HTTPS unless loopback.", kind="secret", unset="no token", read_by="extension.cli_local, extension.comfyui.nodes")
    server_token: str | None = _var("SERVER_TOKEN", "Token hybrid-vae serve requires (Authorization: Bearer TOKEN); --token wins.", kind="secret", unset="no authentication", read_by="server.cli, server.ray_app")
    serve_config: str | None = _var("SERVE_CONFIG", "JSON configuration of hybrid-vae serve's worker processes (serve --workers N sets it; set it yourself to run server.cli:app_from_env under your own uvicorn/gunicorn).", kind="json", unset="`app_from_env` refuses to start", read_by="server.cli.app_from_env")
    family: str | None = _var("FAMILY", "Family key of the VAE a Hugging Face Inference Endpoints handler serves (sd15, sdxl, ...).", kind="text", unset="recognised from the VAE's config", read_by="server.handler.EndpointHandler")
    root: str | None = _var("ROOT", "Path of the hybrid-vae checkout the ComfyUI custom node registers as hybrid_vae when the package is not installed (read by extension/comfyui/__init__.py before the package can be imported).", kind="path", unset="two folders above the custom node", read_by="extension/comfyui/__init__.py")

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("strict", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        if v is None or isinstance(v, bool):
            return bool(v)
        text = str(v).strip().lower()
        if not text:
            return False
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ValueError(f"not a yes/no value; set {'/'.join(TRUE)} to turn it on, {'/'.join(FALSE)} to turn it off, "
                         "or unset it")


def env_name(field: str) -> str:
    """The variable of an :class:`Env` field: ``env_name("profile")`` -> ``"HYBRID_VAE_PROFILE"``."""
    alias = Env.model_fields[field].alias
    assert alias is not None
    return alias


def read_env(environ: Mapping[str, str] | None = None) -> Env:
    """The ``HYBRID_VAE_*`` variables of ``environ`` (default: ``os.environ`` now).

    Raises:
        EnvError: a value that cannot be used, naming the variable, the value and the fix.
    """
    src = os.environ if environ is None else environ
    values = {k: v for k, v in src.items() if k.startswith(PREFIX)}
    try:
        return Env.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else PREFIX
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise EnvError(msg, key_path=name, value=values.get(name)) from None


def markdown_table() -> str:
    """The table of docs/configuration.md: variable, field, type, when unset, what it does, read by."""
    rows = ["| Variable | `Env` field | Type | Unset / default | What it does | Read by |",
            "|---|---|---|---|---|---|"]
    for name, f in Env.model_fields.items():
        extra = f.json_schema_extra
        assert isinstance(extra, dict)
        rows.append(f"| `{f.alias}` | `{name}` | {extra['kind']} | {extra['unset']} | {f.description} | "
                    f"`{extra['read_by']}` |")
    return "\n".join(rows) + "\n"
