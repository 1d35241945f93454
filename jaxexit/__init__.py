"""jaxexit: early-exit BERT-family classifiers (DeeBERT, PCEE-BERT and baselines) in JAX/Flax."""

from jaxexit.api import EarlyExitModel, init_ramps
from jaxexit.config import EncoderConfig
from jaxexit.hf_import import CheckpointError
from jaxexit.modeling import MultiExitEncoder
from jaxexit.tokenization import Tokenizer

__all__ = ["EarlyExitModel", "EncoderConfig", "CheckpointError", "MultiExitEncoder", "Tokenizer", "init_ramps"]
__version__ = "0.1.0"
