"""Files: ``/v1/files`` (its blueprint and serving logic), the file store (SQL rows plus files
on disk) and the checks a batch input file passes on upload."""
