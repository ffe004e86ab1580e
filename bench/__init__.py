"""batchd benchmarks (``make bench``); never run in CI."""
