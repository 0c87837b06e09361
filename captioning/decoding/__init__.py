"""Decoding trained models: the one beam search and sampler, loading models and ensembles, captioning files."""
