"""Early-exit inference with a fine-tuned checkpoint.

    python infer/run.py --patience 2 --tau 0.2                 # PCEE on dev of the latest run
    python infer/run.py --policy entropy --S 0.3 --mode batched --batch-size 64
    python infer/run.py --sweep                                 # every policy over a grid (offline)
    python infer/run.py --policy pcee --patience 2 --target-saving 0.4   # patience fixed, tau calibrated
    python infer/run.py --patience 2 --tau 0.9 --confidence maxprob --ensemble   # PCEE-BERT-v1, ensemble
    echo "a gripping film" | python infer/run.py --patience 2 --tau 0.2 --text -
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from jaxexit.cli import console  # noqa: E402
from jaxexit.exits import runners
from jaxexit.cli.infer import main_cli  # noqa: E402
from jaxexit.cli.policy_flags import add_policy_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a train/finetune.py run directory (default: the latest run in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where train/finetune.py wrote its runs (default: runs)")
    add_policy_flags(p)
    p.add_argument("--split", default="dev",
                   help="dev | test (MNLI: both matched and mismatched, side by side), or one split: dev_matched, ...")
    p.add_argument("--data-dir", help="GLUE TSV directory (default: the one the checkpoint was trained on)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed TSV rows (reported: how many, and where) instead of stopping at the first")
    p.add_argument("--limit", type=int, default=0, help="use only the first N inputs")
    p.add_argument("--mode", choices=runners.MODES, default=None,
                   help="latency (default: batch 1, host decisions) | batched | device | offline")
    p.add_argument("--batch-size", type=int, default=None, help="batched/device/offline (default 64; device 1)")
    p.add_argument("--text", nargs="+", help="classify these texts ('-' reads lines from stdin; pairs: tab-separated)")
    p.add_argument("--output", help="write predictions: the GLUE submission TSV, and *.exits.tsv with exit layers")
    p.add_argument("--json", help="where to write the result JSON (default: <checkpoint>/infer/...)")
    p.add_argument("--sweep", action="store_true", help="offline: every policy over a grid -> CSV and PNG")
    p.add_argument("--target-saving", type=float,
                   help="calibrate the parameters not given to the best score with at least this saving")
    p.add_argument("--max-drop", type=float,
                   help="calibrate the parameters not given to the largest saving within this score drop")
    p.add_argument("--split-seed", type=int, default=None,
                   help="calibration: seed of the random split into calibration and report halves (default 0)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(keep_for_file=False)  # warnings and errors; no library chatter
    try:
        return main_cli(args)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)


if __name__ == "__main__":
    main()
