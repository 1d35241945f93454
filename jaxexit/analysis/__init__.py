"""The papers' tables and figures from one cached pass over a labelled split (`analyze`,
`analyze_vision`), and tables gathered over runs (`tables`).

May import: `jaxexit.exits`, `jaxexit.text`, `jaxexit.vision`, `jaxexit.training`.
"""

from jaxexit.analysis.report import (DEEBERT_DROPS, analyze, analyze_vision, is_vision_run, load_analyses,
                                     runs_timed, tables, timing_rounds, wall_savings)

__all__ = ["DEEBERT_DROPS", "analyze", "analyze_vision", "is_vision_run", "load_analyses", "runs_timed", "tables",
           "timing_rounds", "wall_savings"]
