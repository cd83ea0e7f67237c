"""cifarkit: train a CIFAR-10 classifier, export it verified, run it anywhere.

Importing this package must stay cheap: no torch here (the inference stage never imports it).
"""

__version__ = "0.1.0"
