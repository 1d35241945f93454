"""Shared by the benchmarks: paths, timing, and writing figures with the command that made them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
GLUE = SHARED / "data" / "glue"
# BERT-base's shape (random weights time the same as trained ones): scale_speed.py, random_base.py
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
RESULTS = REPO / "results"


def sst2_dev_texts() -> list[str]:
    """The SST-2 dev sentences, the serving benchmarks' load (../shared)."""
    dev = GLUE / "SST-2" / "dev.tsv"
    if not dev.is_file():
        raise SystemExit(f"{dev} is missing (../shared)")
    return [line.split("\t")[0] for line in dev.read_text().splitlines()[1:] if line.strip()]


def held(items: list[str]) -> dict:
    """`--hold NAME=VALUE ...` as a policy spec: values read as int, else float, else text."""
    if any("=" not in x for x in items):
        raise SystemExit(f"--hold takes NAME=VALUE pairs (e.g. policy=entropy, patience=1), got {items}")

    def value(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    return {k: value(v) for k, v in (x.split("=", 1) for x in items)}


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of `fn` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def machine() -> str:
    """The processor, its widest vector instructions (they move the figures a lot: compare
    results/scale_speed.md, AVX-512, with results/scale_speed_base.md, AVX2 only) and the core count."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = {}  # the first processor's "key: value" lines
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    details = ", ".join(x for x in (fields.get("model name", ""), isa) if x)
    return f"{platform.machine()}{f' ({details})' if details else ''}, {os.cpu_count()} cores"


def write_result(name: str, figures: dict, markdown: str) -> Path:
    """results/<name>.json and .md, both carrying the exact command and the machine."""
    import jax

    RESULTS.mkdir(exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    command = shlex.join(["python", str(script), *sys.argv[1:]])  # as typed in the repository's root
    meta = {"command": command, "machine": machine(), "jax": jax.__version__, "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    header = f"Command: `{command}`  \nMachine: {meta['machine']}, JAX {meta['jax']} ({meta['backend']}), {meta['date']}\n\n"
    (RESULTS / f"{name}.md").write_text(header + markdown)
    return RESULTS / f"{name}.md"
