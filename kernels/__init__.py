"""Kernels for the engine's hot ops. `kernels.reference` holds the plain-PyTorch versions."""
