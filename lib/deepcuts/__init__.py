"""deepcuts: content-based music recommendation at catalogue scale (van den Oord et al. 2013)."""
__version__ = "0.1.0"
