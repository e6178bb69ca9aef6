"""Classify images with a trained AlexNet: top-5 class names with probabilities.

    python predict.py photo.jpg more/ --checkpoint runs/RUN/best.pt           # centre 224 crop
    python predict.py photo.jpg --checkpoint alexnet.pt --tencrop             # the paper's 10 crops, voted

Same preprocessing as training (the 256x256 record image, then the crop(s), minus the run's mean,
0-255 scale); on cuda:0 when a GPU is visible. The logic lives in tools/predict.py.
"""
import sys

from tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
