"""Fixtures shared by the tests, benchmarks and examples: tiny random models, a local tokenizer, a
spawned-rank harness and the family matrix. Not used by the library itself."""
