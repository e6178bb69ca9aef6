"""The training engine behind train.py, in small modules.

config.py (TrainConfig, --demo preset), recipe.py (SGD as the paper wrote it, loss),
schedule.py (lr ÷10 on a validation plateau, at most --max-lr-drops times),
state.py (TrainState: where a run is; the checkpoint's training part),
loop.py (train_steps: the step loop; evaluate), precision.py (bf16/fp16 autocast, the fp16
loss scaler), voting.py (10-crop softmax voting, top-k), checkpoint.py (atomic, weights_only,
finite-only), distributed.py (devices, DDP, the ranks' agreement), profiling.py (per-phase step
timing, trace), signals.py (SIGINT/SIGTERM), logs.py (step lines, TensorBoard), report.py (rich
output), run.py (main: setup, then train -> validate -> schedule -> save per epoch).
The tools for a trained run (figures, export, predict, weights) live in tools/, off the training path.
"""
