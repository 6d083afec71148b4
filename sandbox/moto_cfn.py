"""CloudFormation types moto's CloudFormation does not create, created through moto's own backends.

moto creates queues, tables, roles, functions and log groups from a template, but skips schedules and
alarms (and fails on a Fn::GetAtt to them). Registered here, they go through the same backends the
vendor-shaped APIs use, so a schedule name clash fails the stack as EventBridge Scheduler does
(``ConflictException``) and alarms can be read back with ``describe_alarms``.
``register()`` must run before a stack is created (moto caches its type map).
"""

from __future__ import annotations

import functools
from typing import Any

from moto.cloudformation import parsing
from moto.cloudformation.exceptions import ValidationError
from moto.cloudwatch.models import cloudwatch_backends
from moto.core.common_models import CloudFormationModel
from moto.scheduler.exceptions import ScheduleExists
from moto.scheduler.models import scheduler_backends


# Each type subclasses CloudFormationModel directly: moto finds resource types among its direct subclasses
# only, so a shared base class for the two would hide both.
class CfnSchedule(CloudFormationModel):
    def __init__(self, name: str, group: str | None, arn: str) -> None:
        self.name, self.group, self.arn = name, group, arn

    @staticmethod
    def cloudformation_name_type() -> str:
        return "Name"

    @staticmethod
    def cloudformation_type() -> str:
        return "AWS::Scheduler::Schedule"

    @classmethod
    def has_cfn_attr(cls, attr: str) -> bool:
        return attr == "Arn"

    def get_cfn_attribute(self, attribute_name: str) -> str:
        return self.arn

    @property
    def physical_resource_id(self) -> str:
        return self.name

    @classmethod
    def create_from_cloudformation_json(
        cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any
    ) -> CfnSchedule:
        props = cloudformation_json["Properties"]
        try:
            schedule = scheduler_backends[account_id][region_name].create_schedule(
                description=props.get("Description", ""),
                end_date=props.get("EndDate"),
                flexible_time_window=props["FlexibleTimeWindow"],
                group_name=props.get("GroupName", ""),
                kms_key_arn=props.get("KmsKeyArn"),
                name=resource_name,
                schedule_expression=props["ScheduleExpression"],
                schedule_expression_timezone=props.get("ScheduleExpressionTimezone", ""),
                start_date=props.get("StartDate"),
                state=props.get("State", "ENABLED"),
                target=props["Target"],
                action_after_completion=None,
            )
        except ScheduleExists as clash:  # what CloudFormation reports when the stack fails on it
            raise ValidationError(message=f"{kwargs.get('LogicalId')}: ConflictException: {clash.message}") from clash
        return cls(schedule.name, props.get("GroupName"), schedule.arn)

    @classmethod
    def delete_from_cloudformation_json(
        cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str
    ) -> None:
        group = cloudformation_json.get("Properties", {}).get("GroupName")
        scheduler_backends[account_id][region_name].delete_schedule(group, resource_name)


class CfnAlarm(CloudFormationModel):
    def __init__(self, name: str, arn: str) -> None:
        self.name, self.arn = name, arn

    @staticmethod
    def cloudformation_name_type() -> str:
        return "AlarmName"

    @staticmethod
    def cloudformation_type() -> str:
        return "AWS::CloudWatch::Alarm"

    @classmethod
    def has_cfn_attr(cls, attr: str) -> bool:
        return attr == "Arn"

    def get_cfn_attribute(self, attribute_name: str) -> str:
        return self.arn

    @property
    def physical_resource_id(self) -> str:
        return self.name

    @classmethod
    def create_from_cloudformation_json(
        cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any
    ) -> CfnAlarm:
        props = cloudformation_json["Properties"]
        alarm = cloudwatch_backends[account_id][region_name].put_metric_alarm(
            name=resource_name,
            namespace=props["Namespace"],
            metric_name=props["MetricName"],
            comparison_operator=props["ComparisonOperator"],
            evaluation_periods=int(props["EvaluationPeriods"]),
            period=int(props["Period"]),
            threshold=float(props["Threshold"]),
            statistic=props["Statistic"],
            description=props.get("AlarmDescription", ""),
            dimensions=props.get("Dimensions", []),
            alarm_actions=props.get("AlarmActions", []),
            ok_actions=props.get("OKActions", []),
            treat_missing_data=props.get("TreatMissingData"),
        )
        return cls(alarm.name, alarm.alarm_arn)

    @classmethod
    def delete_from_cloudformation_json(
        cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str
    ) -> None:
        cloudwatch_backends[account_id][region_name].delete_alarms([resource_name])


@functools.cache
def register() -> None:
    for cached in (parsing.get_model_list, parsing.get_model_map, parsing.get_name_type_map):
        cached.cache_clear()
