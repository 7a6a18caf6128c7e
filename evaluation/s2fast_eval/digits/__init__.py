"""Training, guidance frontiers and AutoGuidance for the embedded digits model (s2fast.digits)."""
