"""Several worker processes (``workers = N``): the control plane (:mod:`.control`) runs
health checks, discovery and the aggregated admin endpoint; :mod:`.channel` carries node
state to the workers; :mod:`.supervisor` starts and restarts them. Imports ``serve`` and
below.
"""
