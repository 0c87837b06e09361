"""Caption decoders behind one interface (interface.py) and the registry that names them (registry.py)."""
