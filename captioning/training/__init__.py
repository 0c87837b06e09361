"""Training (01_train.py): the objective, self-critical training, validation, the run folder, curves."""
