"""The command-line tools: everything that parses arguments, prints, reads stdin or sets up
logging for a terminal. The scripts in `train/` and `infer/` and the console scripts call `main`
functions here; the library never imports this package.

May import: every other part of jaxexit.
"""
