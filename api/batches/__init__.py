"""Batches: ``/v1/batches`` (its blueprint and serving logic), the batch store and its status
machine, and the dispatch of a batch's lines to the queue and the collection of their results
into output files."""
