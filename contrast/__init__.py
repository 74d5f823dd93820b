"""contrast: unsupervised visual representation learning (PIC, InstDisc, MoCo, SimCLR)."""
__version__ = "0.1.0"
