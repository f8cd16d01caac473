"""Microbenchmarks for the cacheblend ops and the whole blend: ``python -m bench --help``."""
