"""Small real pieces for trying nf_lightning and for testing code that uses it (as ``lightning.pytorch.demos``):
a LightningModule written without any knowledge of nf_lightning, a learnable synthetic data set, and a
crash drill that kills a NeuroFlux run at fixed points (:mod:`nf_lightning.testing.faults`)."""
