"""groundloop benchmarks: `python -m bench` (or `make bench`) prints one table."""
