"""Benchmarks: scripts that print numbers, off the training path (nothing in prep/, pipeline/,
model/ or engine/ imports them).

    python -m bench.loaders    # our DALI train view against FFCV, a PyTorch DataLoader, the decode floors
    python -m bench.cost       # CPU-seconds per image of each Loader view against plain DALI decoding
    python -m bench.mixing     # how differently consecutive epochs order the records
    python -m bench.prep       # the records writer against FFCV's writer and the bare decode+resize+encode loop
    python -m bench.model      # forward+backward images/s: our two-tower AlexNet against a plain nn.Sequential
    python -m bench.lrn        # the LRN's forward+backward time and memory against torch's module
    python -m bench.photos DIR # crops of real photographs at ImageNet's sizes (bench.prep --photos, the tests)

baselines.py holds the loaders bench.loaders compares ours against.
"""
