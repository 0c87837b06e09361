"""Preparing a captioned dataset: format readers, the pipeline of 00_create_input_files.py, the synthetic set."""
