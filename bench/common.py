"""Shared by the benchmarks: paths, timing, and writing figures with the command that made them."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
GLUE = SHARED / "data" / "glue"
RESULTS = REPO / "results"


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


def write_result(name: str, figures: dict, markdown: str) -> Path:
    """results/<name>.json and .md, both carrying the exact command and the machine."""
    import jax

    RESULTS.mkdir(exist_ok=True)
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]])
    meta = {"command": command, "machine": f"{platform.processor() or platform.machine()}, "
            f"{__import__('os').cpu_count()} cores", "jax": jax.__version__, "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2) + "\n")
    header = f"Command: `{command}`  \nMachine: {meta['machine']}, JAX {meta['jax']} ({meta['backend']}), {meta['date']}\n\n"
    (RESULTS / f"{name}.md").write_text(header + markdown)
    return RESULTS / f"{name}.md"
