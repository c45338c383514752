"""Micro-benchmarks that compare trustseg's building blocks with the libraries users would otherwise use."""
