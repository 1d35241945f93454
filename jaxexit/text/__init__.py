"""The BERT-family stack: encoder config (`config`), the Flax multi-exit encoder (`modeling`) and
its piecewise exit steps (`exit_steps`), the strict Hugging Face import (`hf_import`),
tokenisation, GLUE data, inputs and metrics (`glue`, `inputs`, `metrics`), batches, the text model
(`model.EarlyExitModel`, a `RampModel`), and text training (`train_config`, `steps`, `trainer`,
on the shared loop of `jaxexit.training`).

May import: `jaxexit.exits`, `jaxexit.training`.
"""
