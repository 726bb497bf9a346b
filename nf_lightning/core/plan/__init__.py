"""The plan: Algorithm 1's partition of units into blocks (``partitioner``) and the immutable
:class:`~nf_lightning.core.plan.training_plan.TrainingPlan` it yields (``training_plan``)."""
