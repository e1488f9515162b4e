"""Evaluations beyond perplexity: synthetic long-context retrieval (`hybridize eval --task`) and its heat maps."""
