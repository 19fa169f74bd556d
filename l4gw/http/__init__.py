"""http mode (L7).

- :mod:`.routes`: route matching and path rewriting (no I/O).
- :mod:`.headers`: header rewriting between clients and nodes (no I/O).
- :mod:`.wire`: the node-side HTTP/1.1 codec and the bytes the gateway writes (no I/O).
- :mod:`.io`: byte I/O on plain sockets (by file descriptor) or any trio stream.
- :mod:`.pool`: connections to nodes (connect with retries, TLS, keep-alive pool).
- :mod:`.proxy`: the data path; entry point :func:`l4gw.http.proxy.handle_http_connection`.

Behaviour is documented in ``docs/http.md``.
"""
