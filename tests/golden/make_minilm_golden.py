"""Regenerate tests/golden/minilm_sst2_hidden.npz from transformers' PyTorch BertModel (fp32).

    python tests/golden/make_minilm_golden.py

Stores, for the SST-2 dev sentences of `conftest.sst2_parity_sentences`, the token ids and the
hidden states of every layer (embedding output first) at four real positions of each row
(first, one third, two thirds, last), plus the pooler output. Padding positions are never stored.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import GOLDEN_MINILM, MINILM, sst2_parity_sentences  # noqa: E402

from jaxexit import Tokenizer  # noqa: E402


def main():
    sentences = sst2_parity_sentences()
    batch = Tokenizer.from_pretrained(MINILM)(sentences)
    model = BertModel.from_pretrained(str(MINILM)).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v).long() for k, v in batch.items()}, output_hidden_states=True)
    hidden = np.stack([h.numpy() for h in out.hidden_states])  # [L+1, B, T, H]
    lengths = batch["attention_mask"].sum(1)
    positions = np.stack([np.array([0, n // 3, 2 * n // 3, n - 1]) for n in lengths])  # [B, 4]
    picked = np.take_along_axis(hidden, positions[None, :, :, None], axis=2)  # [L+1, B, 4, H]
    np.savez_compressed(
        GOLDEN_MINILM, sentences=np.array(sentences), input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"], positions=positions, hidden=picked.astype(np.float32),
        pooler_output=out.pooler_output.numpy().astype(np.float32), torch_version=torch.__version__,
    )
    print(f"wrote {GOLDEN_MINILM} ({GOLDEN_MINILM.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
