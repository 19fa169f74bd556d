"""Opening connections to nodes: non-blocking connect with a timeout, retries over distinct
nodes, backend authorization enforced on every attempt.
"""

from __future__ import annotations

import errno
import os
import socket

import structlog
import trio

from .errors import NoHealthyNode, UpstreamConnectError
from .netaddr import SocketAddress
from .nodes import NodeState
from .upstream import UpstreamRuntime

log = structlog.get_logger("l4gw.connect")

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect_socket(address: SocketAddress, timeout: float) -> socket.socket:
    """Open a non-blocking TCP socket connected to ``address`` (TCP_NODELAY set).

    Raises ``OSError`` (``ETIMEDOUT`` after ``timeout`` seconds). The caller owns and closes
    the returned socket; on any error or cancellation the socket is closed here.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(*_NODELAY)
        err = sock.connect_ex(address.sockaddr())
        if err == errno.EINPROGRESS:
            with trio.move_on_after(timeout):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                return sock
            raise OSError(errno.ETIMEDOUT, f"connect timed out after {timeout:g}s")
        if err:
            raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


async def open_node_connection(
    upstream: UpstreamRuntime,
    client_key: bytes,
) -> tuple[socket.socket, NodeState]:
    """Connect to a node of ``upstream``, trying up to ``retries`` distinct nodes.

    On success the node's ``active`` count has been incremented: the caller decrements it when
    the connection ends, and owns the socket. Raises ``NoHealthyNode`` when no node could be
    tried at all and ``UpstreamConnectError`` when every attempt failed. A node that backend
    authorization does not permit is never connected to.
    """
    config = upstream.config
    tried: list[NodeState] = []
    last_error: OSError | None = None
    for _ in range(config.retries):
        node = upstream.pick(tried, client_key)
        if node is None:
            break
        tried.append(node)
        if not upstream.authorization.permits(node.address):
            log.error("node_unauthorized", upstream=upstream.name, node=node.key)
            continue
        # Count the connection on the node from the pick on, not from the connect's end:
        # concurrent picks (least_conn, random_two, max_connections_per_node) must see it.
        node.active += 1
        try:
            sock = await connect_socket(node.address, config.connect_timeout)
        except BaseException as exc:
            node.active -= 1
            if not isinstance(exc, OSError):
                raise
            last_error = exc
            upstream.connect_failed(node)
            log.info(
                "connect_failed",
                upstream=upstream.name,
                node=node.key,
                error=exc.strerror or str(exc),
            )
            continue
        node.connections_total += 1
        upstream.connect_succeeded(node)
        return sock, node
    if last_error is None:
        raise NoHealthyNode(f"upstream {upstream.name}: no node available")
    raise UpstreamConnectError(
        f"upstream {upstream.name}: {len(tried)} connect attempt(s) failed, last: "
        f"{last_error.strerror or last_error}"
    )
