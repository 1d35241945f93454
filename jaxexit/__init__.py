"""jaxexit: early-exit BERT-family classifiers (DeeBERT, PCEE-BERT and baselines) in JAX/Flax."""

from jaxexit.text.model import EarlyExitModel, init_ramps
from jaxexit.text.config import EncoderConfig
from jaxexit.text.hf_import import CheckpointError
from jaxexit.text.modeling import MultiExitEncoder
from jaxexit.text.tokenization import Tokenizer

__all__ = ["EarlyExitModel", "EncoderConfig", "CheckpointError", "MultiExitEncoder", "Tokenizer", "init_ramps"]
__version__ = "0.1.0"
