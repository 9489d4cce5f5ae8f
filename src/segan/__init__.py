"""segan: reproducible SEGAN speech enhancement (Pascual et al., 2017)."""

__version__ = "0.1.0"
