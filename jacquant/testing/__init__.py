"""Small models for tests and benchmarks."""
