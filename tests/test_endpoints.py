"""Several endpoints per family (``extension/endpoints.py``) against real loopback servers.

Every member is a real ``hybrid-vae serve`` app under uvicorn on 127.0.0.1 (behind a switch that can delay or
refuse requests, as a loaded or broken server does); a dead member is a closed port. Checked: failover within
the deadline without the client's backoff, ordering by measured latency, recent errors and health, requests
that are wrong everywhere not repeated, the infotext and decision log naming the member that answered, and the
three ways to give several endpoints (SD.Next setting, drop-in list, CLI ``--endpoint`` repeated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hybrid_vae.extension.endpoints import EndpointPool, join_endpoints
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.orchestrator import HybridDecoder
from hybrid_vae.extension.remote import RemoteClient
from hybrid_vae.policy.errors import RemoteStatusError
from hybrid_vae.policy.model import DecodeSettings
from hybrid_vae.server.app import create_app
from hybrid_vae.server.testing import free_port, serve_in_thread, verified_identity


class Switch:
    """ASGI wrapper: delays every HTTP request by ``delay_s`` and, while ``status`` is set, answers it with a JSON
    error instead of passing it on."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.delay_s, self.status, self.hits = inner, 0.0, None, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.hits += scope["method"] == "POST"  # decodes, not health checks
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status is not None:
                body = json.dumps({"error": f"switched to {self.status}"}).encode()
                await send({"type": "http.response.start", "status": self.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.inner(scope, receive, send)


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return build_tiny_vae("sd15")


@pytest.fixture(scope="module")
def servers(vae: torch.nn.Module) -> Iterator[list[tuple[str, Switch]]]:
    """Three real sd15 servers: ``[(url, switch), ...]``."""
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(3):
            sw = Switch(create_app(families={"sd15": vae}, device="cpu", batch_window_s=0.0))
            out.append((stack.enter_context(serve_in_thread(sw)) + "/sd15", sw))
        yield out


@pytest.fixture(autouse=True)
def _reset(servers: list[tuple[str, Switch]]) -> None:
    for _, sw in servers:
        sw.delay_s, sw.status = 0.0, None


@pytest.fixture(scope="module")
def dead() -> str:
    return f"http://127.0.0.1:{free_port()}/sd15"  # nothing listens there


def _decode(pool: EndpointPool, spec: str, vae: torch.nn.Module, *, seed: int = 0, deadline_s: float = 30.0) -> Any:
    settings = DecodeSettings(allow_remote=True, mode="remote", endpoints={"sd15": spec}, remote_format="raw",
                              remote_deadline_s=deadline_s)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    # the pool as an endpoint already verified to serve this VAE (its canary passed earlier), so each test sees
    # the decode's own failover, not the canary's
    with tempfile.TemporaryDirectory(prefix="hv-identity-") as tmp:
        identity = verified_identity(Path(tmp) / "identity.json", spec, vae)
        return HybridDecoder(settings=settings, remote=pool, identity=identity).decode(z, vae, family="sd15")


def _pool(*, clock: Any = None, **client: Any) -> EndpointPool:
    """A pool whose health is checked only when a test asks (``refresh``), so the order is the test's."""
    kw: dict[str, Any] = {"max_retries": 2, "backoff_base_s": 0.5, **client}
    return EndpointPool(RemoteClient(**kw), health_interval_s=math.inf, **({"clock": clock} if clock else {}))


def test_a_dead_member_is_skipped_at_once_and_named(servers: list[tuple[str, Switch]], dead: str,
                                                    vae: torch.nn.Module) -> None:
    good = servers[0][0]
    pool = _pool()
    res = _decode(pool, f"{dead}|{good}", vae)
    rep = res.report
    assert rep.ran.path == "remote" and not rep.fell_back
    assert rep.remote.endpoint == good  # the member that answered, in the report and the decision log
    assert rep.to_dict()["remote"]["endpoint"] == good
    assert rep.remote.skipped == (f"{dead.split('/')[2]} unreachable",)
    text = rep.infotext()
    assert f"via {good.split('/')[2]} (after {dead.split('/')[2]} unreachable)" in text, text
    assert pool.client.breaker(dead).failures == 1  # one attempt: no retries, no backoff before failing over
    local = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / 0.18215).sample
    assert (res.tensor - local.clamp(-1, 1)).abs().max() < 2 / 255 + 1e-3  # 8-bit on the wire


def test_the_last_member_keeps_the_clients_retries(servers: list[tuple[str, Switch]], dead: str,
                                                   vae: torch.nn.Module) -> None:
    url, sw = servers[1]
    sw.status = 503
    pool = _pool(backoff_base_s=0.01)
    res = _decode(pool, f"{dead}|{url}", vae)  # both fail: the orchestrator falls back to a local decode
    assert res.report.ran.path != "remote" and res.report.fell_back
    assert "no endpoint of the pool answered" in res.report.attempts[0][1]
    assert sw.hits == 3  # 1 + max_retries=2 on the last member
    assert pool.client.breaker(dead).failures == 1


def test_health_check_and_measured_latency_order_the_members(servers: list[tuple[str, Switch]], dead: str,
                                                             vae: torch.nn.Module) -> None:
    (fast, _), (slow, slow_sw) = servers[0], servers[1]
    slow_sw.delay_s = 0.25
    spec = join_endpoints([dead, slow, fast])
    pool = EndpointPool(RemoteClient(), pools=[spec])
    assert pool.order(spec) == [dead, slow, fast]  # nothing known yet: the configured order
    assert pool.refresh(spec, wait=True) == {dead: "down", slow: "ok", fast: "ok"}
    assert pool.order(spec) == [fast, slow, dead]  # measured round trips; the dead one last
    res = _decode(pool, spec, vae)
    assert res.report.remote.endpoint == fast and res.report.remote.skipped == ()
    stats = pool.network_stats()[spec]  # the engine sees the pool as one endpoint: its best member's figures
    assert stats.available and stats.source == "measured" and "pool of 3" in stats.note
    rows = {r["url"]: r for r in pool.status()}
    assert rows[dead]["health"] == "down" and rows[fast]["answered"] == 1


def test_recent_errors_move_a_fast_member_back_until_forgiven(servers: list[tuple[str, Switch]],
                                                              vae: torch.nn.Module) -> None:
    (a, a_sw), (b, b_sw) = servers[0], servers[1]
    b_sw.delay_s = 0.5  # b answers, slowly
    now = [1000.0]
    pool = _pool(clock=lambda: now[0], failure_threshold=10)
    spec = f"{b}|{a}"
    pool.refresh(spec, wait=True)
    assert pool.order(spec) == [a, b]  # measured: a is faster
    a_sw.status = 500
    res = _decode(pool, spec, vae)
    assert res.report.remote.endpoint == b and res.report.remote.skipped == (f"{a.split('/')[2]} HTTP 500",)
    a_sw.status = None
    assert pool.order(spec) == [b, a]  # a failed a moment ago: the slower b first
    assert _decode(pool, spec, vae, seed=1).report.remote.endpoint == b
    now[0] += pool.error_half_life_s  # half an error left: still behind
    assert pool.order(spec) == [b, a]
    now[0] += pool.error_half_life_s  # a quarter: forgiven
    assert pool.order(spec) == [a, b]
    assert _decode(pool, spec, vae, seed=2).report.remote.endpoint == a


def test_a_request_that_is_wrong_everywhere_is_not_repeated(servers: list[tuple[str, Switch]],
                                                            vae: torch.nn.Module) -> None:
    (a, a_sw), (b, b_sw) = servers[0], servers[2]
    a_sw.status = 400
    pool = _pool()
    before = b_sw.hits
    from hybrid_vae.policy.model import DecodeJob, Estimate, Plan
    from hybrid_vae.policy.profiles import load_profiles

    with pytest.raises(RemoteStatusError) as info:
        plan = Plan(path="remote", endpoint=f"{a}|{b}", response_format="raw", dtype="float32",
                    estimate=Estimate(peak_bytes=0, seconds=0.1, peak_source="", seconds_source=""))
        pool.decode(torch.randn(1, 4, 8, 8), plan=plan, job=DecodeJob("sd15", 64, 64), deadline_s=10,
                    family=load_profiles().family("sd15"), height=64, width=64)
    assert info.value.status == 400 and b_sw.hits == before


def test_the_deadline_bounds_the_whole_failover(servers: list[tuple[str, Switch]], vae: torch.nn.Module) -> None:
    (a, a_sw), (b, b_sw) = servers[0], servers[1]
    a_sw.delay_s = b_sw.delay_s = 1.0
    pool = _pool(max_retries=0)
    res = _decode(pool, f"{a}|{b}", vae, deadline_s=0.6)
    assert res.report.fell_back and res.report.ran.path != "remote"
    err = res.report.attempts[0][1]
    assert "no endpoint of the pool answered" in err and ("timeout" in err.lower() or "deadline" in err), err


def test_join_endpoints_and_settings_refuse_bad_values() -> None:
    assert join_endpoints(["http://a/x", " https://b/x ", "http://a/x"]) == "http://a/x|https://b/x"
    assert join_endpoints("http://a/x|http://b/x") == "http://a/x|http://b/x"
    for bad in ([], ["ftp://a"], [3]):
        with pytest.raises(ValueError, match="endpoint"):
            join_endpoints(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must start with http"):
        DecodeSettings(endpoints={"sd15": "http://a/x|ftp://b"})
    with pytest.raises(ValueError, match="twice"):
        DecodeSettings(endpoints={"sd15": "http://a/x|http://a/x"})


def test_dropin_takes_a_list_and_the_cli_takes_endpoint_repeated(servers: list[tuple[str, Switch]], dead: str,
                                                                vae: torch.nn.Module, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from hybrid_vae.extension.cli import main
    from hybrid_vae.extension.dropin import hybrid_decode
    from hybrid_vae.extension.latents import save_latent
    from hybrid_vae.policy.profiles import load_profiles

    good = servers[2][0]
    reports: list[Any] = []
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    img = hybrid_decode(tensor=z, endpoint=[dead, good], vae=vae, scaling_factor=0.18215, image_format="png",
                        settings=DecodeSettings(mode="remote"), on_report=reports.append)
    assert img.size == (64, 64) and reports[0].remote.endpoint == good  # the dead one: skipped or known down
    assert f"via {good.split('/')[2]}" in img.info["hybrid_vae"]

    path = save_latent(z, tmp_path, family="sd15", profile=load_profiles().family("sd15"),
                       meta={"height": 64, "width": 64})
    # the servers decode with build_tiny_vae's weights, --fixture is the trained fixture: the canary would refuse
    # them, so the CLI is told to use the endpoints anyway (this test is about the pool, not identity)
    rc = main(["decode", str(path), "--fixture", "--mode", "remote", "--endpoint", dead, "--endpoint", good,
               "--remote-custom-vae", "-o", str(tmp_path / "out.png"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["remote"]["endpoint"] == good
    assert main(["explain", "--family", "sd15", "--width", "512", "--height", "512", "--remote", "--json",
                 "--endpoint", dead, "--endpoint", good, "--gpu", "NVIDIA GeForce RTX 3070", "--free-gib", "0.1"]) == 0
    d = json.loads(capsys.readouterr().out)
    remote = next(o for o in d["options"] if o["path"] == "remote")
    assert remote["endpoint"] == f"{dead}|{good}" and "pool of 2" in remote["why"]


def test_a_plain_client_refuses_a_pool_clearly(servers: list[tuple[str, Switch]], vae: torch.nn.Module) -> None:
    """A decoder given a bare RemoteClient and a pool setting does not use remote, with a message that names the
    fix: the endpoint's identity canary fails on it (so remote is not chosen), and a decode told to use it anyway
    falls back."""
    spec = f"{servers[0][0]}|{servers[1][0]}"
    settings = DecodeSettings(allow_remote=True, mode="remote", endpoints={"sd15": spec})
    res = HybridDecoder(settings=settings, remote=RemoteClient()).decode(torch.randn(1, 4, 8, 8), vae, family="sd15")
    assert res.report.ran.path != "remote" and "EndpointPool" in res.report.reason
    forced = settings.model_copy(update={"allow_remote_custom_vae": True})
    res = HybridDecoder(settings=forced, remote=RemoteClient()).decode(torch.randn(1, 4, 8, 8), vae, family="sd15")
    assert res.report.fell_back and "EndpointPool" in res.report.attempts[0][1]
