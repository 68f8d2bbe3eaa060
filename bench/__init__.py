"""Latency and throughput profiling: the bench command, stage breakdown, roofline, plots."""
