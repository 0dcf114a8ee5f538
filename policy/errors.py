"""Every error hybrid-vae raises, in one place.

Each error carries its context (the file and key, the endpoint and status, the latent file) so a
message can say what went wrong, with which value, and what to do::

    HybridVAEError
    ├── ProfileError            a profile or settings file is broken (file, key path, value)
    │   └── EnvError                a HYBRID_VAE_* environment variable cannot be used (variable, value)
    ├── SettingsError           a decode setting is outside its type or limits (the front end's name, value); a ValueError
    ├── LatentError             a latent does not match its family (shape, dtype, NaN, ...); also a ValueError
    ├── ArgumentError           a call's argument is not one hybrid-vae accepts; also a ValueError
    ├── PlanError               an executor cannot run a plan (unknown path, unsupported VAE)
    ├── DecodeFailedError       every plan failed; the latent was saved (``latent_path``)
    └── RemoteError             a remote decode failed (``endpoint``)
        ├── RemoteConnectError      connection refused / DNS / TLS
        ├── RemoteTimeoutError      connect or read timeout, or the deadline ran out
        ├── RemoteStatusError       HTTP 4xx/5xx (``status``, ``body``)
        ├── RemoteProtocolError     a response that breaks the protocol (shape, dtype, size, truncation)
        ├── RemoteSecurityError     a token would go where it must not
        └── CircuitOpenError        the endpoint failed repeatedly and is skipped for a while
"""

from __future__ import annotations

from pathlib import Path


class HybridVAEError(Exception):
    """Base class of every hybrid-vae error."""


class ProfileError(HybridVAEError):
    """A profile YAML (built-in or user override) could not be used.

    Attributes:
        file: the file that was read (``None`` for in-memory data).
        key_path: dotted path of the offending key (``families.sdxl.memory.bytes_per_px``), or ``""``.
        value: the offending value (``None`` when the problem is the file itself).
    """

    def __init__(self, message: str, *, file: str | Path | None = None, key_path: str = "",
                 value: object = None) -> None:
        self.file = str(file) if file is not None else None
        self.key_path = key_path
        self.value = value
        self.detail = message
        key = key_path if key_path.isprintable() else repr(key_path)  # a NEL or newline would split the line
        parts = [p for p in (self.file, key if len(key) <= MAX_SHOWN else key[:MAX_SHOWN] + "...") if p]
        shown = "" if value is None else f" (value: {short_repr(value)})"
        super().__init__(": ".join([*parts, f"{message}{shown}"]))


class EnvError(ProfileError):
    """A ``HYBRID_VAE_*`` environment variable holds a value that cannot be used (:mod:`policy.env`).

    ``key_path`` is the variable, ``value`` its value; the message says the fix.
    """

    def __init__(self, message: str, *, key_path: str, value: object = None) -> None:
        super().__init__(message, file="environment", key_path=key_path, value=value)


#: Longest value an error message quotes (a 10 MB YAML value must not become a 10 MB line).
MAX_SHOWN = 120


def short_repr(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said: ``'aaaa...' (10000002 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class SettingsError(HybridVAEError, ValueError):
    """A value for :class:`~policy.model.DecodeSettings` that the model refuses.

    Attributes:
        name: what the user set, in the front end's words (a CLI flag, a ComfyUI widget, an SD.Next option key,
            or the field name).
        value: the value as the user gave it.
    """

    def __init__(self, message: str, *, name: str, value: object = None) -> None:
        self.name, self.value, self.detail = name, value, message
        if name.startswith("--"):  # a flag reads as typed: ``--reserve-gib -1``
            shown = f"{value:g}" if isinstance(value, float) else short_repr(value) if not isinstance(value, int) \
                else str(value)
            super().__init__(f"{name} {shown}: {message}")
        else:
            super().__init__(f"{name}={short_repr(value)}: {message}")


class LatentError(HybridVAEError, ValueError):
    """A latent that cannot be decoded as asked: wrong rank, channels, dtype, NaN/inf, missing size."""


class ArgumentError(HybridVAEError, ValueError):
    """An argument a caller passed is not one hybrid-vae accepts (``HybridDecoder.decode(output="jpeg")``); the
    message names the argument, the value and the values allowed."""


class PlanError(HybridVAEError):
    """An executor was handed a plan it cannot run."""


class DecodeFailedError(HybridVAEError):
    """Every plan of the chain failed. Nothing is lost: the latent was saved to ``latent_path``.

    Attributes:
        latent_path: the ``.safetensors`` file holding the latent and its metadata.
        attempts: ``(plan label, error text)`` for each plan that was tried.
    """

    def __init__(self, message: str, *, latent_path: Path | None,
                 attempts: tuple[tuple[str, str], ...] = ()) -> None:
        self.latent_path = latent_path
        self.attempts = attempts
        super().__init__(message)


class RemoteError(HybridVAEError):
    """A remote decode failed. ``endpoint`` is the URL that was asked."""

    def __init__(self, message: str, *, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(f"{endpoint}: {message}")


class RemoteConnectError(RemoteError):
    """The endpoint could not be reached (refused, DNS, TLS)."""


class RemoteTimeoutError(RemoteError):
    """The endpoint did not answer within the connect/read timeout or the decode deadline."""


class RemoteStatusError(RemoteError):
    """The endpoint answered with an HTTP error status."""

    def __init__(self, message: str, *, endpoint: str, status: int, body: str = "") -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {message}", endpoint=endpoint)


class RemoteProtocolError(RemoteError):
    """The answer breaks the protocol: wrong shape/dtype header, truncated or oversize body, bad image."""


class RemoteSecurityError(RemoteError):
    """A request would send the token to an unconfigured host or over plain HTTP to a remote host."""


class CircuitOpenError(RemoteError):
    """The endpoint failed repeatedly; it is skipped until ``retry_at`` (monotonic seconds)."""

    def __init__(self, message: str, *, endpoint: str, retry_at: float) -> None:
        self.retry_at = retry_at
        super().__init__(message, endpoint=endpoint)
