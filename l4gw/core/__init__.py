"""The core: configuration, policy and state, with no I/O.

The configuration model and loader (:mod:`.config`), path templates, addresses, source
ACLs and backend authorization, rate limits, node selection (balancers), nodes and the
running upstream with its ``ConnectPlan`` and ``NodeLease``, the PROXY protocol codec, the
health state machine, TLS contexts from the configuration, errors and logging set-up.
Nothing here imports trio or opens a socket: every module is tested on its own, most of
them exhaustively with hypothesis. Every other layer builds on this one.
"""
