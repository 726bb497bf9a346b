"""Exits: auxiliary heads (``aux_heads``), exit records, selection and export (``selection``),
scoring exits during a run (``validation``) and inference throughput (``throughput``)."""
