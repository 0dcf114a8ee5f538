"""One token policy (policy/trust.py) for the SD.Next settings and the remote client, tried with look-alike hosts."""

from __future__ import annotations

import pytest
from hybrid_vae.extension.remote import RemoteClient
from hybrid_vae.extension.sdnext_ui import token_endpoints
from hybrid_vae.policy.errors import RemoteSecurityError
from hybrid_vae.policy.trust import HF_TOKEN_POLICY, TokenPolicy, origin

BUILTIN = "https://x2dmsqunjd6k9prw.us-east-1.aws.endpoints.huggingface.cloud/"

#: (url, may it receive the Hugging Face token, why)
HF_CASES = [
    (BUILTIN, True, "a built-in endpoint (subdomain of huggingface.cloud)"),
    ("https://huggingface.co/api", True, "huggingface.co itself"),
    ("https://api-inference.huggingface.co/models/x", True, "a subdomain of huggingface.co"),
    ("HTTPS://X2DMSQUNJD6K9PRW.US-EAST-1.AWS.ENDPOINTS.HUGGINGFACE.CLOUD/", True, "upper case is the same host"),
    ("https://huggingface.co./api", True, "a trailing dot is the same host"),
    ("https://huggingface.co:443/api", True, "the default port written out"),
    ("https://evilhuggingface.co/", False, "look-alike without the dot"),
    ("https://evilhuggingface.cloud/", False, "look-alike without the dot"),
    ("https://huggingface.cloud/", False, "the bare suffix is not a subdomain and not listed"),
    ("https://huggingface.co.evil.com/", False, "huggingface.co as a subdomain of another host"),
    ("https://a.endpoints.huggingface.cloud.evil.com/", False, "suffix in the middle"),
    ("https://huggingface.co@evil.com/", False, "user info: the host is evil.com"),
    ("https://user:pw@x.endpoints.huggingface.cloud/", False, "user info, even on a real host"),
    ("https://huggingfасe.co/", False, "IDN homograph (Cyrillic а, с)"),
    ("https://xn--huggingfae-i0h.co/", False, "punycode of a look-alike"),
    ("https://x.endpoints.huggingface.cloud:8443/", False, "another port"),
    ("https://huggingface.co:8443/", False, "another port on the exact origin"),
    ("http://x.endpoints.huggingface.cloud/", False, "plain http"),
    ("http://huggingface.co/", False, "plain http to the exact host"),
    ("https://x.hf.space/", False, "a Space runs its owner's code"),
    ("ftp://huggingface.co/", False, "not http(s)"),
    ("https://x.endpoints.huggingface.cloud:99999/", False, "unparsable port"),
]


@pytest.mark.parametrize(("url", "allowed", "why"), HF_CASES, ids=[c[2] for c in HF_CASES])
def test_hugging_face_token_policy(url: str, allowed: bool, why: str) -> None:
    assert HF_TOKEN_POLICY.allows(url) is allowed, (url, why, HF_TOKEN_POLICY.check(url))


def test_sdnext_and_remote_client_apply_the_same_policy() -> None:
    """SD.Next keeps the configured endpoints the HF policy allows; the client then sends the token to exactly those
    origins (TokenPolicy.exact): a look-alike never gets it, whichever path the URL takes."""
    urls = [u for u, _, _ in HF_CASES]
    allowed = [u for u, ok, _ in HF_CASES if ok]
    assert token_endpoints(urls) == allowed
    client = RemoteClient(token="hf_secret", trusted_endpoints=token_endpoints(urls))
    for url, ok, why in HF_CASES:
        if url.startswith(("http://", "https://")) and "99999" not in url:
            got = "Authorization" in client._headers(url)  # builds headers only; nothing is sent
            assert got is ok, (url, why)
    with_policy = RemoteClient(token="hf_secret", token_policy=HF_TOKEN_POLICY)
    assert "Authorization" in with_policy._headers(BUILTIN)
    assert "Authorization" not in with_policy._headers("https://evilhuggingface.co/")
    with pytest.raises(ValueError, match="not both"):
        RemoteClient(token="t", trusted_endpoints=[BUILTIN], token_policy=HF_TOKEN_POLICY)


def test_exact_origins() -> None:
    p = TokenPolicy.exact(["https://gpu.example.com/sd15", "http://127.0.0.1:8300/sd15", "http://192.0.2.10/x",
                           "https://u@other.example.com/", "https://ехаmple.com/"])
    assert p.allows("https://GPU.example.com./other/path")
    assert not p.allows("https://gpu.example.com:444/sd15") and not p.allows("http://gpu.example.com/sd15")
    assert not p.allows("https://evil-gpu.example.com/") and not p.allows("https://x.gpu.example.com/")
    assert p.allows("http://127.0.0.1:8300/anything") and not p.allows("http://127.0.0.1:8301/")
    assert p.check("http://192.0.2.10/x") == "plain HTTP to a non-loopback host" and p.insecure("http://192.0.2.10/x")
    assert ("https", "other.example.com", 443) not in p.origins and len(p.origins) == 3  # user info, IDN left out
    with pytest.raises(RemoteSecurityError, match="plain HTTP"):
        RemoteClient(token="t", token_policy=p)._headers("http://192.0.2.10/x")
    assert origin("HTTPS://Example.COM.:443/a") == ("https", "example.com", 443)
    with pytest.raises(ValueError, match="dot-anchored"):
        TokenPolicy(suffixes=("huggingface.co",))
