"""Releases: built and packaged once, kept in each cell's artifacts bucket under their own prefix, never
overwritten or deleted by a rollout, so the previous release stays deployable for a rollback.

    s3://<bucket>/clinicsync/releases/<release>/template.json   the packaged template, release in Metadata
    s3://<bucket>/clinicsync/releases/<release>/...             code and layer archives it points at

A stack's release is read back from its template's ``Metadata.clinicsync.release`` (GetTemplate), which a
change set replaces together with the code: the two never disagree.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from botocore.exceptions import ClientError

PREFIX = "clinicsync/releases"
# CloudFormation's limit for TemplateBody; larger templates must come from S3 (TemplateURL).
TEMPLATE_BODY_LIMIT = 51_200


@dataclass
class PackagedRelease:
    """A release as built once: its template (code locations relative to the release prefix) and archives."""

    name: str
    template: dict[str, Any]
    artifacts: dict[str, bytes] = field(default_factory=dict)  # key under the release prefix -> content


class Packager(Protocol):
    def build(self, release: str) -> PackagedRelease: ...


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub, ...), read as their long forms."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def parse_template(text: str) -> dict[str, Any]:
    loaded = yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass, intrinsic tags only
    if not isinstance(loaded, dict):
        raise ValueError("a template must be a mapping")
    return loaded


def release_of(template: dict[str, Any] | str | None) -> str | None:
    """The release a stack's template carries; None for a stack not deployed by the fleet tool."""
    if template is None:
        return None
    body = parse_template(template) if isinstance(template, str) else template
    meta = body.get("Metadata")
    release = meta.get("clinicsync", {}).get("release") if isinstance(meta, dict) else None
    return str(release) if release else None


class ReleaseStore:
    """One cell's copy of the releases (its own account's bucket: CloudFormation reads code from there)."""

    def __init__(self, s3: Any, bucket: str, region: str) -> None:
        self.s3, self.bucket, self.region = s3, bucket, region

    def key(self, release: str, name: str) -> str:
        return f"{PREFIX}/{release}/{name}"

    def exists(self, release: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.key(release, "template.json"))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def publish(self, packaged: PackagedRelease) -> None:
        """Archives first, template last: a release whose template exists is complete."""
        for name, body in packaged.artifacts.items():
            self.s3.put_object(Bucket=self.bucket, Key=self.key(packaged.name, name), Body=body)
        moves: list[tuple[str, str, str]] = []
        template = _relocate(packaged.template, self.bucket, f"{PREFIX}/{packaged.name}", moves)
        for source_bucket, source_key, key in moves:
            uploaded = key.rsplit("/", 1)[-1] in packaged.artifacts
            if not uploaded and source_bucket not in ("", self.bucket):
                self.s3.copy_object(
                    Bucket=self.bucket, Key=key, CopySource={"Bucket": source_bucket, "Key": source_key}
                )
        template["Metadata"] = {**template.get("Metadata", {}), "clinicsync": {"release": packaged.name}}
        self.s3.put_object(
            Bucket=self.bucket, Key=self.key(packaged.name, "template.json"), Body=json.dumps(template).encode()
        )

    def template_body(self, release: str) -> str:
        got = self.s3.get_object(Bucket=self.bucket, Key=self.key(release, "template.json"))
        return str(got["Body"].read().decode())

    def template_source(self, release: str) -> dict[str, str]:
        """TemplateBody when small enough, else TemplateURL (CloudFormation's 51,200-byte body limit)."""
        body = self.template_body(release)
        if len(body.encode()) <= TEMPLATE_BODY_LIMIT:
            return {"TemplateBody": body}
        url = f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{self.key(release, 'template.json')}"
        return {"TemplateURL": url}


def _relocate(template: dict[str, Any], bucket: str, prefix: str, moves: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Point every code location at this cell's bucket under the release prefix; ``moves`` collects
    (source bucket, source key, new key) for archives packaged elsewhere (copied by ``publish``)."""
    moved: dict[str, Any] = json.loads(json.dumps(template))

    def target(source_bucket: str, source_key: str) -> str:
        key = f"{prefix}/{source_key.rsplit('/', 1)[-1]}"
        moves.append((source_bucket, source_key, key))
        return key

    for resource in moved.get("Resources", {}).values():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            value = props.get(key)
            if isinstance(value, dict) and "Key" in value:
                props[key] = {"Bucket": bucket, "Key": target(str(value.get("Bucket", "")), str(value["Key"]))}
            elif isinstance(value, str) and value.startswith("s3://"):
                source_bucket, _, source_key = value.removeprefix("s3://").partition("/")
                props[key] = f"s3://{bucket}/{target(source_bucket, source_key)}"
        for key in ("Code", "Content"):
            value = props.get(key)
            if isinstance(value, dict) and "S3Key" in value:
                value["S3Key"] = target(str(value.get("S3Bucket", "")), str(value["S3Key"]))
                value["S3Bucket"] = bucket
    return moved


class SamPackager:
    """``sam build`` once, then ``sam package`` into a scratch prefix; the archives are re-published per cell."""

    def __init__(self, sam: str, template: Path, build_dir: Path, staging_bucket: str, region: str | None) -> None:
        self.sam, self.template, self.build_dir = sam, template, build_dir
        self.staging_bucket, self.region = staging_bucket, region

    def build(self, release: str) -> PackagedRelease:
        out = self.build_dir.parent / f"packaged-{release}.yaml"
        region = ["--region", self.region] if self.region else []
        for command in (
            [self.sam, "build", "--template", str(self.template), "--build-dir", str(self.build_dir)],
            [
                self.sam,
                "package",
                "--template-file",
                str(self.build_dir / "template.yaml"),
                "--s3-bucket",
                self.staging_bucket,
                "--s3-prefix",
                f"{PREFIX}/{release}",
                "--output-template-file",
                str(out),
                *region,
            ],
        ):
            result = subprocess.run(command, check=False)  # noqa: S603 - our own argv, no shell
            if result.returncode != 0:
                raise RuntimeError(f"{command[1]} failed (exit {result.returncode})")
        # sam package uploaded the archives to the staging bucket under the release prefix already; the
        # template is kept with its Transform (CloudFormation expands it, CAPABILITY_AUTO_EXPAND).
        return PackagedRelease(release, parse_template(out.read_text(encoding="utf-8")))
