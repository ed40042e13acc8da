"""Analysis jobs: each reads the store lazily, computes chunk-wise and writes analysis/<job>."""
