"""nbdguard: an NBD server for disk images whose formats are pinned, never probed."""

__version__ = "0.1.0"
