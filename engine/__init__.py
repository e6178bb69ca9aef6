"""The training engine behind train.py, in small modules.

config.py (TrainConfig, --demo preset), recipe.py (SGD as the paper wrote it, loss),
schedule.py (lr ÷10 on a validation plateau), loop.py (train_one_epoch, evaluate),
voting.py (10-crop softmax voting, top-k), checkpoint.py (atomic, weights_only),
distributed.py (devices, DDP), profiling.py (per-phase step timing, trace),
signals.py (SIGINT/SIGTERM), report.py (rich output), run.py (main: the order of it all).
"""
