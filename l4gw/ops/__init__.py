"""At the edges: the command line (:mod:`.cli`), the demo, ``l4gw status`` and the resource
checks run at start-up. The top layer: it may import everything, nothing imports it.
"""
