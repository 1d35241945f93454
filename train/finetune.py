"""Fine-tune a multi-exit model on GLUE (what the console script `jaxexit-finetune` does).

    python train/finetune.py --config sst2                      # bert-base-uncased, GLUE via tfds (online)
    python train/finetune.py --config sst2 --model ../shared/models/all-MiniLM-L6-v2 --data-dir ../shared/data/glue/SST-2
    python train/finetune.py --config mrpc --scheme joint        # PABEE/PCEE's joint weighted scheme
    python train/finetune.py --resume runs/sst2-two_stage-20261121-101500
"""

from jaxexit.cli.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
