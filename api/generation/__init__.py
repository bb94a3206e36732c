"""Generation: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, tokenize and
detokenize, and ``/v1/models``. The gateway (admission, enqueue, token streams) and the request
parsing that ``/v1/jobs`` and batches build on live here too."""
