"""Train the 2012 paper's AlexNet on DALI-fed records, the paper's way.

examples:
  python train.py --demo                          # the built-in sample set, a few minutes on a CPU
  python train.py --gpus 0,1 --records DIR        # the paper: tower 0 on cuda:0, tower 1 on cuda:1
  python train.py --gpus 0 --records DIR          # both towers on one GPU
  python train.py --gpus '' --records DIR         # CPU
  torchrun --nproc-per-node 4 train.py --records DIR
      # 4 replicas on this node's GPUs: two GPUs each with 8 GPUs, one each with 4
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      train.py --records DIR                      # the same on two nodes (8 replicas)
  python train.py --resume RUN_DIR                # continue exactly where its last.pt left off
  python train.py --config RUN_DIR/config.json --seed 1   # a new run with another run's flags
  python train.py --eval-only --checkpoint RUN_DIR/best.pt   # single-crop vs 10-crop error
  python train.py --profile --max-steps 20        # where a step's time goes, and a Chrome trace

The run folder (--out, default runs/<UTC timestamp>) gets config.json, metrics.jsonl (one
line per epoch), last.pt, best.pt and eval.json. Exit status: 0 done, 2 bad input, 3 NaN/inf
loss, 4 another torchrun rank vanished (resumable from the last checkpoint), 128+signal when
interrupted (resumable).
"""
import sys


def main() -> int:
    # argv parsed once, here: --help and bad flags are answered before torch and DALI load (seconds)
    from engine.config import parse_command
    cfg, given = parse_command(sys.argv[1:], description=__doc__)
    from engine.run import run
    return run(cfg, given)


if __name__ == "__main__":
    sys.exit(main())
