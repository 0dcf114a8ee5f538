"""Who may receive a bearer token (e.g. a Hugging Face token): one policy for every entry point.

A :class:`TokenPolicy` allows a URL when its origin (scheme, host, port) is one of the exact origins it
lists, or when it is ``https`` on port 443 and its host ends with one of its dot-anchored suffixes
(``.huggingface.cloud`` matches ``x.endpoints.huggingface.cloud``, never ``evilhuggingface.cloud``).
Hosts are compared in canonical form (:func:`origin`): lower-cased, one trailing dot removed, default
ports filled in. A URL with user info (``https://huggingface.co@evil.com/``) or a host that is not plain
ASCII (an IDN homograph; write it in punycode) never matches anything.

Used by the remote client (:class:`extension.remote.RemoteClient` checks every request against its
policy) and the SD.Next settings (:data:`HF_TOKEN_POLICY`: the Hugging Face token goes only to
configured endpoints this policy allows). Pure: no I/O, no DNS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["HF_TOKEN_POLICY", "Origin", "TokenPolicy", "is_loopback", "origin"]

Origin = tuple[str, str, int]


def _host(raw: str | None) -> str:
    """Canonical host: lower case, one trailing dot removed; "" when empty or not plain ASCII."""
    h = (raw or "").strip().lower()
    h = h[:-1] if h.endswith(".") else h
    return h if h.isascii() and h and ".." not in h else ""


def origin(url: str) -> Origin:
    """``(scheme, host, port)`` of ``url``, canonical (see the module docstring), default ports filled in.

    An unparsable port gives port 0 and a non-ASCII host gives host ``""``: such an origin matches nothing.
    """
    p = urlsplit(str(url).strip())
    scheme = (p.scheme or "").lower()
    try:
        port = p.port
    except ValueError:
        return scheme, _host(p.hostname), 0
    return scheme, _host(p.hostname), port or (443 if scheme == "https" else 80)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (no DNS lookup)."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """Where a token may go: exact origins, or HTTPS hosts under dot-anchored suffixes.

    Attributes:
        origins (`frozenset[Origin]`, defaults to empty): exact ``(scheme, host, port)`` origins; a plain
            ``http`` origin is honoured only for loopback hosts (:meth:`insecure` says when one is listed).
        suffixes (`tuple[str, ...]`, defaults to `()`): host suffixes, each starting with ``"."``; they match
            subdomains only, and only over ``https`` on port 443.
    """

    origins: frozenset[Origin] = frozenset()
    suffixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for s in self.suffixes:
            if not s.startswith(".") or _host(s[1:]) != s[1:] or "." not in s[1:]:
                raise ValueError(f"token host suffix {s!r} must be dot-anchored lower-case ASCII, e.g. '.example.com'")

    @classmethod
    def exact(cls, urls: Iterable[str]) -> TokenPolicy:
        """A policy allowing exactly the origins of ``urls`` (URLs with user info or non-ASCII hosts are left out)."""
        keep = set()
        for u in urls:
            o = origin(u)
            if o[1] and o[2] and not _userinfo(u):
                keep.add(o)
        return cls(origins=frozenset(keep))

    def check(self, url: str) -> str | None:
        """None when ``url`` may receive the token; else a short reason why not."""
        if _userinfo(url):
            return "the URL carries user info (user@host)"
        scheme, host, port = origin(url)
        if not host or not port:
            return "the host is not plain ASCII (use punycode) or the URL cannot be parsed"
        if scheme not in ("http", "https"):
            return f"scheme {scheme!r} is not http(s)"
        if (scheme, host, port) in self.origins:
            if scheme == "http" and not is_loopback(host):
                return "plain HTTP to a non-loopback host"
            return None
        if scheme == "https" and port == 443 and any(host.endswith(s) for s in self.suffixes):
            return None
        return "not a trusted origin"

    def allows(self, url: str) -> bool:
        """True when ``url`` may receive the token (:meth:`check` is None)."""
        return self.check(url) is None

    def insecure(self, url: str) -> bool:
        """True when ``url``'s origin is listed but is plain HTTP to a non-loopback host (refuse loudly)."""
        scheme, host, port = origin(url)
        return scheme == "http" and (scheme, host, port) in self.origins and not is_loopback(host)


def _userinfo(url: str) -> bool:
    p = urlsplit(str(url).strip())
    return "@" in (p.netloc or "")


#: Hugging Face's own hosts: ``https://huggingface.co`` and HTTPS subdomains of ``huggingface.co`` and
#: ``huggingface.cloud`` (Inference Endpoints, where the hybrid-inference VAE endpoints run). Not
#: ``*.hf.space``: a Space runs its owner's code, so it must never see the user's token.
HF_TOKEN_POLICY = TokenPolicy(origins=frozenset({("https", "huggingface.co", 443)}),
                              suffixes=(".huggingface.co", ".huggingface.cloud"))
