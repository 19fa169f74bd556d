"""l4gw: a load-balancer daemon for reaching private services (L4 splice proxy, h11 L7 gateway)."""

__version__ = "0.1.0"
