"""Benchmarks (`make bench`): results go to bench/results/*.json, summarised in bench/README.md."""
