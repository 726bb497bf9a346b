"""Block-wise training: the run that coordinates it (``run``), its parts (``block_schedule``,
``budgeted_step``), local learning of one block (``local_learning``), schedules, optimizer
recipes, batches, feature augmentation and the collective across ranks."""
