"""Settings every AWS client of ours is built with. Apart from ``table`` so that a handler that only
queues (the webhook receiver) builds its SQS client without loading the table's machinery."""

from __future__ import annotations

from botocore.config import Config

# Our AWS requests are built by code, not typed by a user: botocore's client-side check of each one
# against the service model is CPU spent for nothing (AWS still validates them).
PLAIN_CONFIG = Config(parameter_validation=False)
