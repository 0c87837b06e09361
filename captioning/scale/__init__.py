"""Large collections: captions streamed to captions.jsonl, work shared over torchrun processes."""
