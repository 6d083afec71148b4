"""The Lambda runtime: the composition root, settings, observability, batch processing and route middlewares."""
