"""http mode (L7): one sans-I/O exchange, two drivers, and the codecs around them.

The logic:

- :mod:`.exchange`: the request/response state machine of a client connection (routing,
  admission, what goes to the node and back, retries, gateway errors, timeout phases);
  events in, command bits out, no I/O and no clock.
- :mod:`.admission`: routing and refusal of one request, in the order clients see.
- :mod:`.routes`: route matching and path rewriting.
- :mod:`.headers`: header rewriting between clients and nodes.
- :mod:`.responses`: what the gateway answers itself, and the access record.
- :mod:`.timeouts`: the phases a connection can wait in.

The codecs (no I/O):

- :mod:`.request`: the lean parser of plain client request heads (the fast path's).
- :mod:`.strict`: the refusal of obsolete line folding in client heads, before h11.
- :mod:`.wire`: the node-side HTTP/1.1 codec and the bytes the gateway writes.

The drivers and their I/O:

- :mod:`.conn`: :class:`~.conn.HttpConn`, what both drivers share about a client connection
  (accounting, access lines, pool, route table).
- :mod:`.fastpath`: the reactor's driver (callbacks, no task switch per request).
- :mod:`.proxy`: the task's driver (h11, uploads, upgrades, PROXY/TLS toward nodes); entry
  point :func:`l4gw.http.proxy.handle_http_connection`.
- :mod:`.pool`: connections to nodes (a ``ConnectPlan`` per connect, leases, keep-alive).
- :mod:`.io`: byte I/O on plain sockets (by file descriptor) or any trio stream.
- :mod:`.tlsstream`: TLS on an ``SSLObject``, shared by both drivers.

Behaviour is documented in ``docs/http.md``, the architecture in ``docs/architecture.md``.
"""
