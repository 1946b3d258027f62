""" Benchmarks and studies of dropcluster-timm, run as modules from the repository root (``python -m benchmarks.bench_layer``)."""
