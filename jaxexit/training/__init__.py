"""Training machinery shared by text and vision: the one training loop with its hooks (`loop`),
the named stages (`stages`), the losses both model stacks train on (`losses`), run directories
and orbax checkpoints (`checkpoint`), where a run's log records go (`logs`), the optax partition
that freezes parameters (`optim`), data parallelism over every device (`parallel`), and the typed
config field the command-line flags are made from (`configs`).

May import: `jaxexit.exits`; not the model stacks (`jaxexit.text`, `jaxexit.vision`), nor `jaxexit.cli`.
"""
