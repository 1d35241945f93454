"""The papers' tables and figures from one cached pass over a labelled split (`analyze`,
`analyze_vision`: `report`), their numbers (`compute`), figures (`plots`) and the markdown tables
gathered over runs (`tables`: `markdown`); one policy run on a split, sweeps and calibration
(`inference`, what `jaxexit-infer` reports).

May import: `jaxexit.exits`, `jaxexit.text`, `jaxexit.vision`, `jaxexit.training`.
"""

from jaxexit.analysis.compute import DEEBERT_DROPS, wall_savings
from jaxexit.analysis.markdown import load_analyses, runs_timed, tables, timing_rounds
from jaxexit.analysis.report import analyze, analyze_vision, is_vision_run

__all__ = ["DEEBERT_DROPS", "analyze", "analyze_vision", "is_vision_run", "load_analyses", "runs_timed", "tables",
           "timing_rounds", "wall_savings"]
