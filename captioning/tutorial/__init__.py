"""The tutorial's checkpoints: pickled modules read without running code, converted to this suite's format."""
