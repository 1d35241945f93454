"""Training machinery shared by text and vision: run directories and orbax checkpoints
(`checkpoint`), the optax partition that freezes parameters (`optim`), data parallelism over
every device (`parallel`).

May import: `jaxexit.exits`; not the model stacks (`jaxexit.text`, `jaxexit.vision`).
"""
