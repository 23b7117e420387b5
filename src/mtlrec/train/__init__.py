"""Training loop, metrics, saving and loading."""
