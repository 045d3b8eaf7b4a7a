"""Preprocessing logic behind the thin scripts in ``preprocessing/``: converters and the batch runner."""
