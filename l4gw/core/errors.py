"""Errors that decide what a client gets (each carries the outcome and an HTTP status hint),
and ``BindError``, raised at start or on a reload when a listening socket cannot be opened."""

from __future__ import annotations


class GatewayError(Exception):
    """A request or connection that the gateway refuses or cannot serve.

    ``outcome`` is the label used in ``l4gw_connections_total`` and the access log;
    ``status_hint`` is the HTTP status the L7 layer answers with.
    """

    outcome = "error"
    status_hint = 500


class NoHealthyNode(GatewayError):
    """No node of the upstream may take a new connection (all down, drained or full)."""

    outcome = "no_healthy_node"
    status_hint = 503


class UpstreamConnectError(GatewayError):
    """Every connect attempt (up to ``retries``, over distinct nodes) failed."""

    outcome = "connect_failed"
    status_hint = 502


class BindError(Exception):
    """A listening socket could not be opened; the message names the listener and address."""
