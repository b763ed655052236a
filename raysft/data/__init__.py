"""Data stages: read sources, normalize rows, tokenize with label masks, apply the length policy, pack."""
