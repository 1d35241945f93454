"""Serve a fine-tuned run over HTTP; its speed/quality trade-off is turned while it runs.

    python infer/serve.py --checkpoint runs/sst2-joint --target-saving 0.5       # pcee at >= 50% saving
    python infer/serve.py --patience 2 --tau 0.3 --port 8080                      # explicit thresholds
    python infer/serve.py --target-saving 0.25 --latency-slo-ms 150 --max-saving 0.75   # speed follows the load

    curl -s localhost:8000/v1/classify -H 'content-type: application/json' -d '{"texts": ["a gripping film"]}'
    curl -s -X PUT localhost:8000/v1/policy -H 'content-type: application/json' -d '{"target_saving": 0.75}'

A target saving maps to the best thresholds of the policy (pcee unless --policy names another; its
parameters given as flags are held) with at least that saving on the run's labelled dev split.
Ramp outputs on that split are computed once and stored in <run>/serving/.

Also installed as the console script `jaxexit-serve`; the code is in `jaxexit/cli/serve.py`.
"""

from jaxexit.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
