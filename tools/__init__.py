"""Tools for a trained run, off the training path (engine/ does not import them).

    python -m tools.figures RUN_DIR     # curves, the paper's Figure 3 (conv1) and Figure 4 (neighbours)
    python -m tools.export RUN_DIR      # a weights-only file and a traced one
    python predict.py IMAGE...          # classify images (tools/predict.py)
    python -m tools.ablate RECORDS --out DIR   # the paper's section-3 ablations, with error bars

weights.py loads a trained net from a checkpoint or either exported file. figures.py is the command;
kernel_figure.py draws Figure 3, neighbours.py Figure 4, captions.py the caption line and PNG both write.
"""
