"""frugalseg: label-efficient medical image segmentation.

Importing the package is light on purpose: torch, MONAI and the readers load only when a command needs them.
"""

__version__ = "0.1.0"
