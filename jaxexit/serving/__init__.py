"""The HTTP service: the engine (dynamic batches whose rows exit individually; `engine`), the
active policy and request handling (`service`, with `build_service` assembling a run into a
service), the calibration table that maps a target saving to thresholds (`table`), risk targets
and the shadow buffer of inputs also run to the last layer (`shadow`), the latency controller
(`controller`), Prometheus metrics (`metrics`), request errors (`errors`) and the FastAPI app
(`app`).

May import: `jaxexit.exits`, `jaxexit.text`, `jaxexit.training`.
"""
