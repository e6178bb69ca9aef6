"""The training engine behind train.py, in small modules.

config.py (TrainConfig, --demo preset, argv parsed once), recipe.py (SGD as the paper wrote it,
loss), schedule.py (lr ÷10 on a validation plateau, at most --max-lr-drops times),
state.py (TrainState: where a run is, its one step counter; the checkpoint's training part),
loop.py (train_steps: the step loop; evaluate), precision.py (bf16/fp16 autocast, the fp16
loss scaler), voting.py (10-crop softmax voting, top-k), checkpoint.py (atomic, weights_only,
finite-only), distributed.py (devices, DDP, the ranks' agreement), profiling.py (per-phase step
timing, trace), signals.py (SIGINT/SIGTERM), logs.py (step lines, TensorBoard), report.py (rich
output). A run: run.py (main, train, fit: the driver), session.py (devices, net, loaders),
resume.py, runfolder.py (lock, config, checkpoints, stop lines), evaluation.py (validation,
10-crop, --eval-only).
The tools for a trained run (figures, export, predict, weights) live in tools/, off the training path.
"""
