"""Data sets read from local files or shipped with a package: nothing is downloaded at run time."""
from slimops.data.digits import load_digits

__all__ = ["load_digits"]
