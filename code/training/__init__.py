"""The trainer's building blocks: loss, cross-rank communication, gradient caching, checkpoints."""
