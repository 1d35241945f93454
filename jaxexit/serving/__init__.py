"""The HTTP service: the engine (dynamic batches whose rows exit individually, the active policy,
the calibration table, the latency controller, Prometheus metrics; `engine`) and its API (`app`).

May import: `jaxexit.exits`, `jaxexit.text`, `jaxexit.training`.
"""
