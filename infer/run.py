"""Early-exit inference with a fine-tuned checkpoint.

    python infer/run.py --patience 2 --tau 0.2                 # PCEE on dev of the latest run
    python infer/run.py --policy entropy --S 0.3 --mode batched --batch-size 64
    python infer/run.py --sweep                                 # every policy over a grid (offline)
    python infer/run.py --policy pcee --patience 2 --target-saving 0.4   # patience fixed, tau calibrated
    python infer/run.py --patience 2 --tau 0.9 --confidence maxprob --ensemble   # PCEE-BERT-v1, ensemble
    echo "a gripping film" | python infer/run.py --patience 2 --tau 0.2 --text -

Also installed as the console script `jaxexit-infer`; the code is in `jaxexit/cli/infer.py`.
"""

from jaxexit.cli.infer import main

if __name__ == "__main__":
    raise SystemExit(main())
