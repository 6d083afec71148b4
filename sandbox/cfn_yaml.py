"""Read CloudFormation / SAM YAML templates (short intrinsic tags included) into plain dicts.

``load_template("template.yaml")`` returns the template with short tags expanded to their JSON form
(``!Ref X`` -> ``{"Ref": "X"}``, ``!GetAtt A.B`` -> ``{"Fn::GetAtt": ["A", "B"]}``, ``!Sub s`` ->
``{"Fn::Sub": s}`` ...), exactly what CloudFormation itself (and moto's CloudFormation) accepts.
Timestamps are NOT parsed (``AWSTemplateFormatVersion: 2010-09-09`` stays a string).

Helpers for callers that read resource definitions (tests, the local runtime):

- ``resources_of_type(template, "AWS::SQS::Queue")``
- ``function_properties(template, "StageSyncerFunction")``: a SAM function's properties with
  ``Globals.Function`` merged in the way the SAM translator merges them;
- ``resolve(value, refs=..., get_att=..., conditions=...)``: substitute a small set of intrinsics
  (Ref, Fn::Sub, Fn::GetAtt, Fn::Join, Fn::Select, Fn::Split, Fn::If and the condition functions)
  when you need concrete values outside CloudFormation.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CfnLoader",
    "IntrinsicError",
    "evaluate_conditions",
    "function_properties",
    "load_template",
    "loads",
    "merge_globals",
    "resolve",
    "resources_of_type",
]

# Short-form tags whose long form is "Fn::<Name>"; !Ref and !Condition are special-cased below.
_FN_TAGS = (
    "And",
    "Base64",
    "Cidr",
    "Equals",
    "FindInMap",
    "ForEach",
    "GetAZs",
    "GetAtt",
    "If",
    "ImportValue",
    "Join",
    "Length",
    "Not",
    "Or",
    "Select",
    "Split",
    "Sub",
    "ToJsonString",
    "Transform",
)


class CfnLoader(yaml.SafeLoader):
    """SafeLoader that understands CloudFormation short tags and keeps dates as strings."""


# Drop the timestamp resolver: CloudFormation treats 2010-09-09 as a string.
CfnLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_node(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    raise yaml.constructor.ConstructorError(None, None, f"unexpected node {node!r}", node.start_mark)


def _ref(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    return {"Ref": _construct_node(loader, node)}


def _condition(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    return {"Condition": _construct_node(loader, node)}


def _get_att(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    value = _construct_node(loader, node)
    if isinstance(value, str):
        resource, _, attribute = value.partition(".")
        return {"Fn::GetAtt": [resource, attribute]}
    return {"Fn::GetAtt": value}


def _make_fn(name: str) -> Callable[[yaml.SafeLoader, yaml.Node], dict[str, Any]]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        return {f"Fn::{name}": _construct_node(loader, node)}

    return construct


CfnLoader.add_constructor("!Ref", _ref)
CfnLoader.add_constructor("!Condition", _condition)
for _name in _FN_TAGS:
    CfnLoader.add_constructor(f"!{_name}", _get_att if _name == "GetAtt" else _make_fn(_name))


def loads(text: str) -> dict[str, Any]:
    """Parse template text."""
    data = yaml.load(text, Loader=CfnLoader)
    if not isinstance(data, dict):
        raise ValueError("a CloudFormation template must be a mapping at the top level")
    return data


def load_template(path: str | Path) -> dict[str, Any]:
    """Parse a template file."""
    return loads(Path(path).read_text(encoding="utf-8"))


def resources_of_type(template: Mapping[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    """Logical id -> resource definition for every resource of ``resource_type``."""
    return {
        logical_id: resource
        for logical_id, resource in template.get("Resources", {}).items()
        if resource.get("Type") == resource_type
    }


def _is_intrinsic(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in {"Ref", "Condition"} | {f"Fn::{name}" for name in _FN_TAGS}
    )


def merge_globals(global_value: Any, local_value: Any) -> Any:
    """SAM's Globals merge: maps merge recursively (local wins), lists concatenate, scalars are replaced."""
    if isinstance(global_value, dict) and isinstance(local_value, dict):
        if _is_intrinsic(global_value) or _is_intrinsic(local_value):
            return copy.deepcopy(local_value)
        merged = copy.deepcopy(global_value)
        for key, value in local_value.items():
            merged[key] = merge_globals(merged[key], value) if key in merged else copy.deepcopy(value)
        return merged
    if isinstance(global_value, list) and isinstance(local_value, list):
        return copy.deepcopy(global_value) + copy.deepcopy(local_value)
    return copy.deepcopy(local_value)


def function_properties(template: Mapping[str, Any], logical_id: str) -> dict[str, Any]:
    """Effective properties of an ``AWS::Serverless::Function`` after merging ``Globals.Function``."""
    resource = template["Resources"][logical_id]
    if resource.get("Type") != "AWS::Serverless::Function":
        raise ValueError(f"{logical_id} is {resource.get('Type')}, not AWS::Serverless::Function")
    globals_ = template.get("Globals", {}).get("Function", {})
    merged = merge_globals(globals_, resource.get("Properties", {}))
    assert isinstance(merged, dict)
    return merged


class IntrinsicError(ValueError):
    """An intrinsic function that ``resolve`` cannot evaluate with what it was given."""


_SUB_VAR = re.compile(r"\$\{([^!}][^}]*)\}")


def resolve(
    value: Any,
    refs: Mapping[str, Any] | None = None,
    get_att: Callable[[str, str], Any] | None = None,
    conditions: Mapping[str, bool] | None = None,
) -> Any:
    """Evaluate intrinsics in ``value`` (recursively) and return plain data.

    ``refs`` maps parameter names, pseudo parameters (``AWS::Region`` ...) and logical ids to their
    Ref values; ``get_att(logical_id, attribute)`` answers Fn::GetAtt; ``conditions`` maps condition
    names to booleans (for Fn::If / Condition). ``AWS::NoValue`` removes the key or list item.
    """
    refs = refs or {}
    conditions = conditions or {}
    no_value = object()

    def attr(logical_id: str, attribute: str) -> Any:
        if get_att is None:
            raise IntrinsicError(f"no get_att callback for {logical_id}.{attribute}")
        return get_att(logical_id, attribute)

    def ref(name: str) -> Any:
        if name == "AWS::NoValue":
            return no_value
        if name not in refs:
            raise IntrinsicError(f"unresolved Ref {name}")
        return refs[name]

    def condition(name: str) -> bool:
        if name not in conditions:
            raise IntrinsicError(f"unknown condition {name}")
        return bool(conditions[name])

    def sub(template: str, variables: Mapping[str, Any]) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return str(variables[name])
            if "." in name and name not in refs:
                logical_id, _, attribute = name.partition(".")
                return str(attr(logical_id, attribute))
            return str(ref(name))

        # "${!Literal}" renders as "${Literal}"
        return _SUB_VAR.sub(replace, template).replace("${!", "${")

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [item for item in (walk(v) for v in node) if item is not no_value]
        if not isinstance(node, dict):
            return node
        if _is_intrinsic(node):
            (fn, arg), *_ = node.items()
            if fn == "Ref":
                return ref(arg)
            if fn == "Condition":
                return condition(arg)
            if fn == "Fn::GetAtt":
                logical_id, attribute = arg if isinstance(arg, list) else str(arg).split(".", 1)
                return attr(walk(logical_id), walk(attribute))
            if fn == "Fn::Sub":
                if isinstance(arg, list):
                    text, variables = arg
                    return sub(text, {k: walk(v) for k, v in variables.items()})
                return sub(arg, {})
            if fn == "Fn::Join":
                delimiter, items = arg
                return str(delimiter).join(str(v) for v in walk(items))
            if fn == "Fn::Select":
                index, items = arg
                return walk(items)[int(walk(index))]
            if fn == "Fn::Split":
                delimiter, text = arg
                return str(walk(text)).split(delimiter)
            if fn == "Fn::If":
                name, when_true, when_false = arg
                return walk(when_true) if condition(name) else walk(when_false)
            if fn == "Fn::Equals":
                left, right = walk(arg)
                return str(left) == str(right)
            if fn == "Fn::Not":
                return not walk(arg)[0]
            if fn == "Fn::And":
                return all(walk(arg))
            if fn == "Fn::Or":
                return any(walk(arg))
            raise IntrinsicError(f"resolve() does not support {fn}")
        return {k: r for k, r in ((k, walk(v)) for k, v in node.items()) if r is not no_value}

    result = walk(value)
    return None if result is no_value else result


def evaluate_conditions(template: Mapping[str, Any], refs: Mapping[str, Any]) -> dict[str, bool]:
    """Evaluate the template's ``Conditions`` (which may refer to each other) against ``refs``."""
    pending = dict(template.get("Conditions", {}))
    known: dict[str, bool] = {}
    while pending:
        progressed = False
        for name, expression in list(pending.items()):
            try:
                known[name] = bool(resolve(expression, refs=refs, conditions=known))
            except IntrinsicError:
                continue
            del pending[name]
            progressed = True
        if not progressed:
            raise IntrinsicError(f"cannot evaluate conditions {sorted(pending)}")
    return known
