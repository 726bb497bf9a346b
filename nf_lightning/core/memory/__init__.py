"""Memory: budgets as byte counts (``budget``), the meters (``meter``), the per-unit profiler
(``profiler``) and the step guard that holds training to the budget (``enforcement``)."""
