"""Benchmarks: latency, FLOPs and memory against the paper's and the challenge's figures."""
