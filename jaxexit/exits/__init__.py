"""The early-exit core, independent of any network.

Owns the exit policies: one registry entry per policy (`registry`: parameters, step, closed-form
offline rule, grids, earliest exit; docs/adding-a-policy.md), the float64 per-ramp measures they
threshold (`measures`), and the policy value and its state machine, stepped on the host, on the
device and offline (`policies`); the offline simulation, sweeps and calibration over cached ramp
logits `[L, N, C]` (`offline`); the live runners (`runners`: latency, batched, on-device) with the
one on-device exit loop (`device`); and what they exchange with a model (`types`: `RampOutputs`
and the `RampModel` protocol).

May import: nothing else of jaxexit. Text and vision models plug in through `RampModel`.
"""
