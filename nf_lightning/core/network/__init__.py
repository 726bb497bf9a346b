"""The network as NeuroFlux sees it: its decomposition into units (``decompose``) and activation
checkpointing over those units for the ``bp_ckpt`` baseline (``checkpointing``)."""
