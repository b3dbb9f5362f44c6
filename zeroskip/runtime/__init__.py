"""The runtime: compile (cc.py), cache (cache.py), count (stats.py) and launch (ops.py) kernels."""
