"""Benchmark evaluation: inference entry points, scorers (`restore.eval.scoring`) and test fixtures."""
