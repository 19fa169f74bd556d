"""Hot-path benchmarks: l4gw against a direct connection, HAProxy and nginx, side by side.

Run ``python -m bench --help`` from the repository root; docs/benchmarks.md explains the figures.
"""
