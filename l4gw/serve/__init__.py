"""The daemon: what runs one process's listeners and their upstreams.

:mod:`.daemon` owns the nursery, the reactor, the deadline sweeper and the node pool, and
drains them; :mod:`.listeners` binds, accepts, admits and dispatches each connection;
:mod:`.admin` serves the admin endpoint with :mod:`.metrics` and :mod:`.statusdoc`;
:mod:`.upstreams`, :mod:`.healthchecks` and :mod:`.discovery` keep the node sets current;
:mod:`.reloading` applies a new configuration file; :mod:`.systemd` talks to the service
manager. Imports the core, ``l4`` and ``http``.
"""
