"""Layer 4: the epoll reactor, connecting to nodes, relaying bytes, and the deadline sweeper.

The reactor (:mod:`.reactor`) is only an event loop: descriptors, handlers and timers.
:mod:`.connect` drives the core's ``ConnectPlan`` from a task or from reactor callbacks;
:mod:`.relay` moves bytes between two sockets (splice, half-close, resets passed on);
:mod:`.deadlines` is the one sweeper of idle and phase timeouts. Imports only the core.
"""
