"""The service's Prometheus metrics (`GET /metrics`), in a registry of their own."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self, num_layers: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxexit_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("jaxexit_request_errors", "HTTP requests answered with a 4xx or 5xx",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("jaxexit_request_latency_seconds", "POST /v1/classify latency, arrival to answer",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.inputs = Counter("jaxexit_inputs", "inputs classified", registry=r)
        self.batch_inputs = Histogram("jaxexit_batch_inputs", "inputs per model batch",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.exit_layer = Histogram("jaxexit_exit_layer", "exit layer per input",
                                    buckets=tuple(range(1, num_layers + 1)), registry=r)
        self.target_saving = Gauge("jaxexit_target_saving", "active target saving (NaN: explicit thresholds)",
                                   registry=r)
        self.expected_saving = Gauge("jaxexit_expected_saving",
                                     "saving of the active policy on the calibration split (NaN: no table)", registry=r)
        self.realised_saving = Gauge("jaxexit_realised_saving", "1 - avg exit layer / L over the last inputs",
                                     registry=r)
        self.p95 = Gauge("jaxexit_latency_p95_seconds", "p95 request latency over the controller's window",
                         registry=r)
        self.policy_changes = Counter("jaxexit_policy_changes", "active policy replaced", ["source"], registry=r)
        self.compiles = Counter("jaxexit_compiles_after_warmup", "XLA compilations after the warm-up", registry=r)
        self.max_risk = Gauge("jaxexit_max_risk", "the active risk target's max_risk (NaN: no risk target)",
                              registry=r)
        self.risk_bound = Gauge("jaxexit_risk_bound", "the active certificate's upper confidence bound on the risk "
                                "(NaN: no certificate; 0: nothing certified, the full model)", registry=r)
        self.shadow_inputs = Counter("jaxexit_shadow_inputs", "inputs also run to the last layer (shadowed)",
                                     registry=r)
        self.shadow_disagreements = Counter("jaxexit_shadow_disagreements",
                                            "shadowed inputs served a prediction other than the full model's",
                                            registry=r)
        self.shadow_buffer = Gauge("jaxexit_shadow_buffer_inputs", "shadowed inputs in the buffer", registry=r)
        self.shadow_consistency = Gauge("jaxexit_shadow_consistency_risk",
                                        "fraction of the buffer's inputs served a prediction other than the full "
                                        "model's (NaN: empty)", registry=r)
        self.target_saving.set(math.nan)
        self.expected_saving.set(math.nan)
        self.p95.set(math.nan)
        self.realised_saving.set(math.nan)
        for gauge in (self.max_risk, self.risk_bound, self.shadow_consistency):
            gauge.set(math.nan)
