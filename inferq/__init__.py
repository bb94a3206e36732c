"""The ``inferq`` command line: one entry point over every process."""
