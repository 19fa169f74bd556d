"""Listener pieces that need no daemon: binding, admission, the connection-task guard."""

from __future__ import annotations

import socket

import pytest
import structlog
import trio

from l4gw.core.acl import SourceACL
from l4gw.core.config import parse_config
from l4gw.core.netaddr import SocketAddress, parse_network
from l4gw.core.ratelimit import RateLimiter
from l4gw.core.runtime import ListenerRuntime, ListenerStats
from l4gw.serve.listeners import BindError, _guarded, admit, bind_listener


def runtime(mode: str, *, deny: str = "", rate: float = 0, maximum: int = 0) -> ListenerRuntime:
    config = parse_config(
        {
            "upstreams": {"web": {"nodes": ["127.0.0.1:1"]}},
            "listeners": [
                {
                    "name": "l",
                    "listen": "127.0.0.1:0",
                    "mode": mode,
                    "upstream": "web",
                    "max_connections": maximum,
                    "rate_limit": rate,
                }
            ],
        }
    )
    lc = config.listeners[0]
    return ListenerRuntime(
        config=lc,
        stats=ListenerStats(),
        acl=SourceACL((), (parse_network(deny),) if deny else ()),
        rate_limiter=RateLimiter(lc.rate_limit, lc.rate_limit_burst),
        upstreams={},
    )


def test_admit_tcp_refuses_at_accept() -> None:
    listener = runtime("tcp", deny="10.0.0.0/8", rate=1, maximum=1)
    assert admit(listener, "10.1.2.3", 0.0) == "denied"
    assert admit(listener, "192.0.2.1", 0.0) is None
    assert admit(listener, "192.0.2.1", 0.0) == "rate_limited"
    listener.stats.active = 1
    assert admit(listener, "192.0.2.2", 5.0) == "max_connections"


def test_admit_http_leaves_acl_and_rate_to_each_request() -> None:
    """http mode answers 403/429 per request, so the accept loop lets those through."""
    listener = runtime("http", deny="10.0.0.0/8", rate=1, maximum=1)
    assert admit(listener, "10.1.2.3", 0.0) is None
    assert admit(listener, "10.1.2.3", 0.0) is None
    listener.stats.active = 1
    assert admit(listener, "10.1.2.3", 0.0) == "max_connections"


def test_bind_failure_names_listener_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=rf"listener web: cannot listen on 127.0.0.1:{port}"):
            bind_listener("web", SocketAddress("127.0.0.1", port))


async def test_a_bug_in_a_handler_costs_one_connection_not_the_daemon() -> None:
    listener = runtime("tcp")

    async def broken(_listener: ListenerRuntime) -> None:
        raise RuntimeError("a bug")

    with trio.fail_after(5), structlog.testing.capture_logs() as logs:
        await _guarded(broken, listener)
    assert logs[0]["event"] == "connection_failed"
    assert logs[0]["listener"] == "l"


async def test_cancellation_still_propagates() -> None:
    listener = runtime("tcp")

    async def sleeper(_listener: ListenerRuntime) -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        with trio.move_on_after(0.01) as scope:
            await _guarded(sleeper, listener)
        assert scope.cancelled_caught
