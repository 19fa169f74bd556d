"""The phases of an HTTP connection, for the daemon's deadline sweeper.

A connection sets ``deadline`` (a float, trio time) and ``phase`` as it goes; nothing is
armed or disarmed per request (a cancel scope with a deadline per wait costs more than
parsing the request). It is a ``KeepAlive`` entry of the daemon's
:class:`l4gw.l4.deadlines.Deadlines` (handed to it explicitly), which calls the connection's
``expire()`` once its deadline has passed; the connection then answers according to the phase
(408, 504, or just closes) and closes. In phase ``IDLE`` the sweeper also ends it as soon as
its listener drains.
"""

from __future__ import annotations

from ..l4.deadlines import IDLE

__all__ = ["BODY", "BUSY", "HEAD", "IDLE", "RESPONSE", "SEND", "UPLOAD"]

# What a connection is waiting for; decides what happens when its deadline passes.
# IDLE (0, from l4gw.l4.deadlines): the next request (keep-alive): close silently
HEAD = 1  # the rest of a request head: 408, close
BUSY = 2  # no deadline of its own (connecting: connect_timeout applies)
UPLOAD = 3  # request body bytes from the client: close
RESPONSE = 4  # the node's response head: 504, close
BODY = 5  # response body bytes from the node, or the client taking them: close
SEND = 6  # the client taking a response made here: close
