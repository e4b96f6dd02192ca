"""Developer tools for vnafs (not installed with the package): `python -m tools.bench`."""
