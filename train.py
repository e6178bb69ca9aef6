"""Train the 2012 paper's AlexNet on DALI-fed records, the paper's way.

    python train.py --demo                            # the built-in sample set, a few minutes on a CPU
    python train.py --gpus 0,1 --records DIR          # towers on cuda:0 and cuda:1, DALI on cuda:0
    python train.py --gpus 0 --records DIR            # both towers on one GPU
    python train.py --gpus '' --records DIR           # CPU
    torchrun --nnodes N --nproc-per-node K train.py --gpus-per-replica 2 --records DIR   # DDP replicas
    python train.py --resume RUN_DIR                  # continue exactly where last.pt left off
    python train.py --eval-only --checkpoint RUN_DIR/best.pt   # single-crop vs 10-crop error
    python train.py --profile --max-steps 20          # where a step's time goes + Chrome trace

Every flag: ``python train.py --help``. The run folder (``--out``, default runs/<timestamp>)
gets config.json, metrics.jsonl (one line per epoch), last.pt, best.pt and eval.json.
The loop itself lives in engine/ (engine/run.py orchestrates).
"""
import sys

from engine.run import main

if __name__ == "__main__":
    sys.exit(main())
