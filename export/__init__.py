"""The builders: a checkpoint -> a parity-gated engine directory (manifest, weights, one artifact per backend)."""
