"""`sdlora bench`: speed and memory figures (benchmarks, not tests)."""
