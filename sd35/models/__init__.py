"""Our own PyTorch implementations of the SD3 family's networks."""
