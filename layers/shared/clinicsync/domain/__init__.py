"""The domain: models, config, rules and ports. No boto3, no httpx, no adapter."""
