"""Evaluation building blocks: the held-out test sets and the pre-flight of an evaluation run."""
