"""The BERT-family stack: encoder config, the Flax multi-exit encoder and its piecewise exit
steps, the strict Hugging Face import, tokenisation, GLUE data and metrics, batches, the text
model (`model.EarlyExitModel`, a `RampModel`), and text training (config, steps, trainer).

May import: `jaxexit.exits`, `jaxexit.training`.
"""
