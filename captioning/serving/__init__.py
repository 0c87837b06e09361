"""The library side of 04_serve.py: the model thread, the loaded model, upload checks, the allocator."""
