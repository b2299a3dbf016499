"""oppiefs: fork / commit / prune of whole directory states (FUSE + OverlayFS + LMDB CAS)."""

__version__ = "0.1.0"
