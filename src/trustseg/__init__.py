"""trustseg: trustworthy and efficient semantic segmentation."""

__version__ = "0.1.0"
