"""nf_lightning: NeuroFlux adaptive local learning for PyTorch Lightning."""
