"""The SAM transform as CloudFormation runs it, for tests that judge what is really deployed.

samtranslator (the library ``sam`` and CloudFormation's ``AWS::Serverless`` transform use) lives in
``.venv-sam``, next to the SAM CLI; it runs there in a subprocess and hands back the CloudFormation JSON.
Code and layer locations become ``s3://<bucket>/<logical id>.zip``, as ``sam deploy`` uploads them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAM_PYTHON = ROOT / ".venv-sam" / "bin" / "python"
REGION = "eu-central-1"

_TRANSFORM = r"""
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class NoManagedPolicies:
    def load(self):
        return {}

path, bucket, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
template = yaml_parse(open(path).read())
for logical_id, resource in template["Resources"].items():
    props = resource.get("Properties", {})
    for key in ("CodeUri", "ContentUri"):
        if key in props:
            props[key] = f"s3://{bucket}/{logical_id}.zip"
print(json.dumps(transform(template, params, NoManagedPolicies())))
"""


def available() -> bool:
    return SAM_PYTHON.exists()


def transform(template: Path, parameters: Mapping[str, str], bucket: str = "artifacts") -> dict[str, Any]:
    """``template`` after the SAM transform, for a stack with these parameter values."""
    result = subprocess.run(
        [str(SAM_PYTHON), "-c", _TRANSFORM, str(template), bucket, json.dumps(dict(parameters))],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AWS_DEFAULT_REGION": REGION, "PATH": "/usr/bin:/bin", "SAM_CLI_TELEMETRY": "0"},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    transformed: dict[str, Any] = json.loads(result.stdout)
    return transformed
