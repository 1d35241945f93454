"""The early-exit core, independent of any network.

Owns the exit policies (`policies`: one state machine per policy, stepped on the host, on the
device and offline), the offline simulation, sweeps and calibration over cached ramp logits
`[L, N, C]` (`offline`), the live runners (`runners`: latency, batched, on-device) and what they
exchange with a model (`types`: `RampOutputs` and the `RampModel` protocol).

May import: nothing else of jaxexit. Text and vision models plug in through `RampModel`.
"""
