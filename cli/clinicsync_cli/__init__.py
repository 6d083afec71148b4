"""``clinicsync``: the operator's command line (typer + rich). It works against a deployed stack and against
the local runtime alike: it finds a clinic's queues and table from its CloudFormation stack, and boto3's
usual settings (profile, region, ``AWS_ENDPOINT_URL`` for the local runtime) say which AWS that is."""
