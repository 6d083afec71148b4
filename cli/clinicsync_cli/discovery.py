"""Onboarding: read a clinic's live CRM and MIS, propose a config, and check a config against them.

``discover_crm``/``discover_mis`` read what is there (pipelines, stages, custom fields, webhook
registrations; MIS statuses, branches, doctors). ``propose_config`` turns that into a clinic config the
engineer reviews (the status -> stage map by stage semantics and names, the field map by existing fields).
``check_config`` compares a config with the live systems and returns every problem at once.

Only ids, stage and field names and counts are read here: no patient record leaves the MIS.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from clinicsync.adapters.amocrm import webhook as amocrm_webhook
from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.bitrix24 import webhook as bitrix24_webhook
from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.adapters.medods.source import MedodsApi
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.fieldmap import FIELD_PRESETS
from clinicsync.domain.fieldtypes import accepted_types, compatible, default_type, kind_of
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync.domain.ports import MisSource
from clinicsync.domain.statuses import DEFAULT_STATUSES

Semantics = Literal["open", "won", "lost"]

# Events the stack's webhook receiver understands, per CRM (Bitrix24 event.bind names, amoCRM settings):
# the receiver's own lists, so what is registered is what is read.
BITRIX24_EVENTS = tuple(bitrix24_webhook.EVENTS)
AMOCRM_EVENTS = amocrm_webhook.EVENTS

# Canonical fields written to a CRM custom field (everything else is native or handled explicitly).
BITRIX24_NATIVE = {"price", "comment", "birth_date", "full_name", "phone", "email"}
BITRIX24_ORIGIN = {"mis_patient_id", "mis_appointment_id"}  # ORIGIN_ID
AMOCRM_NATIVE = {"price", "full_name", "phone", "email"}
CONTACT_CUSTOM_ALWAYS = ("opt_outs", "opt_ins")  # consent fields, read and written whatever the field map

# Stage names -> canonical status, tried in this order (a "confirmed booking" is confirmed, not booked).
STAGE_WORDS: tuple[tuple[S, tuple[str, ...]], ...] = (
    (S.CANCELLED, ("отмен", "cancel")),
    (S.NO_SHOW, ("неявк", "не приш", "no show", "no-show", "noshow")),
    (S.RESCHEDULED, ("перен", "reschedul")),
    (S.CONFIRMED, ("подтвер", "confirm")),
    (S.ARRIVED, ("пришёл", "пришел", "пришла", "в клинике", "arriv")),
    (S.COMPLETED, ("состоял", "посетил", "проведен", "оказан", "complet", "visited", "done")),
    (S.BOOKED, ("запис", "book", "appointment")),
)
REPEAT_WORDS = ("повтор", "repeat", "вторичн")

# amoCRM custom field names -> canonical field (clinics name them; ids differ per account).
# (entity, canonical field) -> words a CRM field's label holds (all of one tuple; "=word": the whole label).
AMOCRM_FIELD_WORDS: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {
    ("contact", "mis_patient_id"): (("пациент", "мис"), ("patient", "mis"), ("patient id",)),
    ("contact", "opt_outs"): (("отказ", "рассыл"), ("opt", "out"), ("unsubscrib",)),
    ("contact", "opt_ins"): (("соглас", "рассыл"), ("opt", "in")),
    ("contact", "representative"): (("представител",), ("опекун",), ("guardian",)),
    ("contact", "age"): (("возраст",), ("=age",)),
    ("contact", "sex"): (("=пол",), ("=sex",), ("gender",)),
    ("contact", "birth_date"): (("дата", "рожд"), ("birth",)),
    ("contact", "residence"): (("место", "жительств"), ("residence",)),
    ("contact", "card_comment"): (("коммент", "карт"), ("card", "comment")),
    ("contact", "patient_status"): (("статус", "пациент"), ("patient", "status")),
    ("contact", "guarantee_letter"): (("гарантийн",), ("guarantee",)),
    ("contact", "policy_number"): (("номер", "полис"), ("policy", "number")),
    ("contact", "policy_valid_until"): (("полис", "действ"), ("срок", "полис"), ("policy", "valid")),
    ("contact", "cancellation_date"): (("дата", "отмен"), ("cancel",)),
    ("deal", "mis_appointment_id"): (("запис", "мис"), ("appointment", "mis"), ("appointment id",)),
    ("deal", "visit_at"): (("дата", "прием"), ("дата", "приём"), ("дата", "визит"), ("visit",)),
    ("deal", "status"): (("статус", "запис"), ("appointment status",)),
    ("deal", "is_dms"): (("дмс",), ("dms",), ("insurance",)),
    ("deal", "doctor"): (("врач",), ("doctor",)),
    ("deal", "branch"): (("филиал",), ("branch",)),
    ("deal", "booked_by"): (("администратор",), ("кто", "записал"), ("booked", "by")),
    ("deal", "booked_at"): (("дата", "создан"), ("booked", "at")),
    ("deal", "service_codes"): (("код", "услуг"), ("service", "code")),
    ("deal", "comment"): (("коммент",), ("comment",)),
    ("deal", "assignment_id"): (("направлен",), ("назначен",), ("assignment",)),
    ("deal", "patient_status"): (("статус", "пациент"), ("patient", "status")),
    ("deal", "visit_category"): (("категори",), ("category",)),
    ("deal", "charged"): (("начислен",), ("к оплате",), ("charged",)),
    ("deal", "discount"): (("скидк",), ("discount",)),
    ("deal", "paid"): (("оплачен",), ("=paid",)),
}


@dataclass(frozen=True)
class Stage:
    id: str
    name: str
    sort: int
    semantics: Semantics


@dataclass
class CrmPipeline:
    id: str
    name: str
    stages: list[Stage]
    main: bool = False


@dataclass(frozen=True)
class CrmField:
    entity: Literal["deal", "contact"]
    key: str  # Bitrix24 FIELD_NAME, amoCRM field id
    name: str
    type: str


@dataclass
class CrmDiscovery:
    kind: str
    account: str
    pipelines: list[CrmPipeline]
    fields: list[CrmField]
    webhooks: dict[str, set[str]] | None  # handler URL -> events; None: this auth cannot list them
    requests: int = 0

    def pipeline(self, pipeline_id: str) -> CrmPipeline | None:
        return next((p for p in self.pipelines if p.id == pipeline_id), None)

    def field_keys(self, entity: str) -> dict[str, CrmField]:
        return {f.key: f for f in self.fields if f.entity == entity}


@dataclass
class MisDiscovery:
    kind: str
    statuses: Counter[str] = field(default_factory=Counter)  # raw status -> visits seen recently
    branches: list[tuple[str, str]] = field(default_factory=list)  # (id, title)
    doctors: list[tuple[str, str]] = field(default_factory=list)  # (id, specialty): staff ids, no names
    note: str = ""


@dataclass(frozen=True)
class Problem:
    area: Literal["credentials", "stages", "fields", "statuses", "webhooks", "mis"]
    message: str
    next_step: str
    severity: Literal["error", "warning"] = "error"


# --- CRM discovery -------------------------------------------------------------------------------------


def _rows(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        value = list(value.values())
    return [row for row in value or [] if isinstance(row, dict)]


def _bitrix_semantics(code: Any) -> Semantics:
    return "won" if code == "S" else "lost" if code == "F" else "open"


def discover_bitrix24(client: Bitrix24Client) -> CrmDiscovery:
    profile = client.call("profile").get("result") or {}
    categories = client.call("crm.category.list", {"entityTypeId": 2}).get("result") or {}
    listed = categories.get("categories", []) if isinstance(categories, dict) else []
    commands: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for cat in listed:
        cid = str(cat.get("id"))
        entity = "DEAL_STAGE" if cid == "0" else f"DEAL_STAGE_{cid}"
        commands[f"s{cid}"] = ("crm.status.list", {"filter": {"ENTITY_ID": entity}})
    commands["deal_fields"] = ("crm.deal.userfield.list", {})
    commands["contact_fields"] = ("crm.contact.userfield.list", {})
    result = client.batch(commands).result
    pipelines = []
    for cat in listed:
        cid = str(cat.get("id"))
        stages = [
            Stage(
                str(s["STATUS_ID"]),
                str(s.get("NAME", "")),
                int(s.get("SORT", 0)),
                _bitrix_semantics(s.get("SEMANTICS")),
            )
            for s in _rows(result.get(f"s{cid}"))
        ]
        pipelines.append(
            CrmPipeline(
                cid, str(cat.get("name", "")), sorted(stages, key=lambda s: s.sort), cat.get("isDefault") == "Y"
            )
        )
    fields = [
        CrmField(
            entity, str(f["FIELD_NAME"]), str(f.get("EDIT_FORM_LABEL") or f["FIELD_NAME"]), str(f.get("USER_TYPE_ID"))
        )
        for entity in ("deal", "contact")
        for f in _rows(result.get(f"{entity}_fields"))
    ]
    webhooks: dict[str, set[str]] | None = None
    if client.is_oauth:
        webhooks = {}
        for binding in _rows(client.call("event.get").get("result")):
            webhooks.setdefault(str(binding.get("handler")), set()).add(str(binding.get("event")).upper())
    account = f"user {profile.get('ID', '?')}"
    return CrmDiscovery("bitrix24", account, pipelines, fields, webhooks, client.requests)


def _embedded(body: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        return []
    return [r for r in (body.get("_embedded") or {}).get(key) or [] if isinstance(r, dict)]


def discover_amocrm(client: AmoCrmClient) -> CrmDiscovery:
    account = client.request("GET", "/api/v4/account") or {}
    pipelines = []
    for p in _embedded(client.request("GET", "/api/v4/leads/pipelines"), "pipelines"):
        stages = []
        for s in _embedded(p, "statuses"):
            sid = int(s["id"])
            semantics: Semantics = "won" if sid == 142 else "lost" if sid == 143 else "open"
            stages.append(Stage(str(sid), str(s.get("name", "")), int(s.get("sort", 0)), semantics))
        pipelines.append(
            CrmPipeline(
                str(p["id"]), str(p.get("name", "")), sorted(stages, key=lambda s: s.sort), bool(p.get("is_main"))
            )
        )
    fields: list[CrmField] = []
    for entity, path in (("deal", "leads"), ("contact", "contacts")):
        page = 1
        while True:
            body = client.request("GET", f"/api/v4/{path}/custom_fields", params={"page": page, "limit": 50})
            rows = _embedded(body, "custom_fields")
            fields += [CrmField(entity, str(f["id"]), str(f.get("name", "")), str(f.get("type", ""))) for f in rows]  # type: ignore[arg-type]
            if not rows or not ((body or {}).get("_links") or {}).get("next"):
                break
            page += 1
    webhooks: dict[str, set[str]] = {}
    for hook in _embedded(client.request("GET", "/api/v4/webhooks"), "webhooks"):
        webhooks[str(hook.get("destination"))] = {str(s) for s in hook.get("settings") or []}
    name = f"account {account.get('id', '?')}" if isinstance(account, dict) else "account"
    return CrmDiscovery("amocrm", name, pipelines, fields, webhooks, client.requests)


def discover_crm(client: Bitrix24Client | AmoCrmClient) -> CrmDiscovery:
    return discover_bitrix24(client) if isinstance(client, Bitrix24Client) else discover_amocrm(client)


# --- MIS discovery -------------------------------------------------------------------------------------


def discover_medods(api: MedodsApi, days: int = 60, now: float | None = None, sample: int = 500) -> MisDiscovery:
    found = MisDiscovery("medods")
    since = int((now or time.time()) - days * 86400)
    seen = 0
    for rows in api.pages("/appointments", {"updatedAtAfter": since}, 100):
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("status"), str):
                found.statuses[row["status"]] += 1
        seen += len(rows)
        if seen >= sample:
            break
    for rows in api.pages("/clinics", {}, 100):
        found.branches += [(str(r.get("id")), str(r.get("title", ""))) for r in rows if isinstance(r, dict)]
    for rows in api.pages("/users", {"userGroup": "medical_staff"}, 100):
        found.doctors += [(str(r.get("id")), str(r.get("specialty", ""))) for r in rows if isinstance(r, dict)]
    return found


def default_mis_discovery(kind: str) -> MisDiscovery:
    return MisDiscovery(
        kind,
        Counter(dict.fromkeys(DEFAULT_STATUSES.get(kind, {}), 0)),
        note=f"{kind}: statuses are the documented defaults; branches and doctors are not listed by this API",
    )


# --- proposal ------------------------------------------------------------------------------------------


def _classify(stage: Stage) -> S | None:
    name = stage.name.lower()
    for status, words in STAGE_WORDS:
        if any(w in name for w in words):
            return status
    return None


def propose_stages(pipeline: CrmPipeline) -> tuple[dict[S, str], list[str]]:
    """Status -> stage by the stages' names and semantics; returns the map and what was guessed."""
    guessed: list[str] = []
    open_stages = [s for s in pipeline.stages if s.semantics == "open"]
    lost = [s for s in pipeline.stages if s.semantics == "lost"]
    chosen: dict[S, str] = {}
    for stage in pipeline.stages:
        status = _classify(stage)
        if status is None or status in chosen:
            continue
        if status is S.CANCELLED or stage.semantics == "open":
            chosen[status] = stage.id
    if S.CANCELLED not in chosen and lost:
        chosen[S.CANCELLED] = lost[0].id
        guessed.append(f"cancelled -> {lost[0].id} (the first lost stage)")
    later = open_stages[1:] or open_stages
    if S.BOOKED not in chosen and later:
        chosen[S.BOOKED] = later[0].id
        guessed.append(f"booked -> {later[0].id} (the first open stage after the entry stage)")
    if S.COMPLETED not in chosen and open_stages:
        chosen[S.COMPLETED] = open_stages[-1].id
        guessed.append(f"completed -> {open_stages[-1].id} (the last open stage)")
    fallbacks = {S.CONFIRMED: S.BOOKED, S.RESCHEDULED: S.BOOKED, S.ARRIVED: S.COMPLETED}
    for status, other in fallbacks.items():
        if status not in chosen and other in chosen:
            chosen[status] = chosen[other]
            guessed.append(f"{status.value} -> {chosen[other]} (same stage as {other.value})")
    if S.NO_SHOW not in chosen:
        booked_at = next((i for i, s in enumerate(open_stages) if s.id == chosen.get(S.BOOKED)), 0)
        target = open_stages[booked_at - 1].id if booked_at > 0 else chosen.get(S.CANCELLED)
        if target:
            chosen[S.NO_SHOW] = target
            guessed.append(f"no_show -> {target} (an open stage before booked, for a call back)")
    return chosen, guessed


def _custom_fields(kind: str, entity: str, names: tuple[str, ...]) -> list[str]:
    native = BITRIX24_NATIVE | BITRIX24_ORIGIN if kind == "bitrix24" else AMOCRM_NATIVE
    wanted = [n for n in names if n not in native]
    if entity == "contact":
        wanted += [n for n in CONTACT_CUSTOM_ALWAYS if n not in wanted]
    if kind == "amocrm":
        wanted = [*(["mis_patient_id"] if entity == "contact" else ["mis_appointment_id"]), *wanted]
    return list(dict.fromkeys(wanted))


def bitrix24_field_name(name: str, crm_names: Mapping[str, str]) -> str:
    return crm_names.get(name) or f"UF_CRM_CS_{name.upper()}"


def _mapped_key(config: ClinicConfig, kind: str, entity: Literal["contact", "deal"], name: str) -> str:
    mapped = config.fields.crm_field(entity, name)
    if kind == "bitrix24":
        return mapped.id if mapped else bitrix24_field_name(name, {})
    return mapped.id if mapped else ""


def _label_has(label: str, word: str) -> bool:
    return label == word[1:] if word.startswith("=") else word in label


def _amocrm_match(name: str, entity: str, fields: list[CrmField], taken: set[str]) -> CrmField | None:
    """The first field whose label fits and whose type can hold the value; else the first that fits
    (reported as the wrong type). An account's own «Согласие на рассылку» checkbox is no opt-in list."""
    fitting = [
        f
        for words in AMOCRM_FIELD_WORDS.get((entity, name), ())
        for f in fields
        if f.entity == entity and f.key not in taken and all(_label_has(f.name.lower().strip(), w) for w in words)
    ]
    return next((f for f in fitting if compatible("amocrm", name, f.type)), fitting[0] if fitting else None)


def propose_fields(
    crm: CrmDiscovery, contact: tuple[str, ...], deal: tuple[str, ...]
) -> tuple[dict[str, dict[str, dict[str, str]]], list[str]]:
    """``crm_fields`` per entity (id and the live field's type) for every custom field the lists write;
    returns them and what is missing. A live field whose type cannot hold the value is not proposed."""
    found: dict[str, dict[str, dict[str, str]]] = {"contact": {}, "deal": {}}
    missing: list[str] = []
    for entity, wanted in (("contact", contact), ("deal", deal)):
        live = crm.field_keys(entity)
        taken: set[str] = set()
        for name in _custom_fields(crm.kind, entity, wanted):
            if crm.kind == "bitrix24":
                key = bitrix24_field_name(name, {})
                match = live.get(key)
                found[entity][name] = {"id": key, "type": match.type if match else default_type(crm.kind, name)}
                if match is None:
                    missing.append(f"{entity} field {key} ({name})")
                continue
            match = _amocrm_match(name, entity, crm.fields, taken)
            if match is None:
                missing.append(f"{entity} field for {name} (type {', '.join(accepted_types(crm.kind, name))})")
            elif not compatible(crm.kind, name, match.type):
                missing.append(
                    f"{entity} field for {name}: «{match.name}» ({match.key}) is a {match.type} field, which "
                    f"cannot hold it (use {', '.join(accepted_types(crm.kind, name))})"
                )
            else:
                taken.add(match.key)
                found[entity][name] = {"id": match.key, "type": match.type}
    return found, missing


@dataclass
class Proposal:
    data: dict[str, Any]
    notes: list[str]


def propose_config(
    clinic_id: str,
    mis: MisDiscovery,
    mis_url: str,
    crm: CrmDiscovery,
    secret_refs: Mapping[str, str],
    timezone: str = "Europe/Moscow",
    preset: str | None = None,
) -> Proposal:
    notes: list[str] = []
    if not crm.pipelines:
        raise ValueError(f"{crm.kind} has no deal pipelines: create one first")
    primary = next((p for p in crm.pipelines if p.main), crm.pipelines[0])
    repeat = next(
        (p for p in crm.pipelines if p is not primary and any(w in p.name.lower() for w in REPEAT_WORDS)), None
    )
    pipelines: dict[str, Any] = {}
    for role, pipeline in (("primary", primary), ("repeat", repeat)):
        if pipeline is None:
            continue
        stages, guessed = propose_stages(pipeline)
        missing = [s.value for s in S if s not in stages]
        if missing:
            notes.append(f"pipeline {pipeline.id}: no stage found for {', '.join(missing)}: fill them in")
        notes += [f"pipeline {pipeline.id}: guessed {g}" for g in guessed]
        pipelines[role] = {
            "category_id": pipeline.id,
            "stages": {s.value: stages.get(s, "FILL_ME") for s in S},
            "closed_stages": [s.id for s in pipeline.stages if s.semantics != "open"],
        }
    contact, deal = (
        FIELD_PRESETS[preset] if preset else (("full_name", "phone", "email"), ("visit_at", "status", "is_dms"))
    )
    crm_fields, missing_fields = propose_fields(crm, contact, deal)
    notes += [
        f"missing CRM {m}: `clinicsync check --create-fields` creates it (Bitrix24), or create it by hand"
        for m in missing_fields
    ]
    known = DEFAULT_STATUSES.get(mis.kind, {})
    unknown = sorted(s for s in mis.statuses if s not in known)
    notes += [
        f"MIS status {s!r} ({mis.statuses[s]} recent visits) is not mapped: set it in mis.statuses" for s in unknown
    ]
    if mis.note:
        notes.append(mis.note)
    matching: dict[str, Any] = {"default_region": "RU"}
    if crm.kind == "amocrm":
        adoptable = [s.id for s in primary.stages if s.semantics == "open"][:2]
        matching["adopt_deal_stages"] = adoptable
    data: dict[str, Any] = {
        "clinic_id": clinic_id,
        "timezone": timezone,
        "mis": {
            "kind": mis.kind,
            "base_url": mis_url,
            "secret_ref": secret_refs["mis"],
            "statuses": {},  # unknown statuses are in the notes; `check` reports them until they are mapped
        },
        "crm": {"kind": crm.kind, "secret_ref": secret_refs["crm"], "pipelines": pipelines},
        "fields": {
            **({"preset": preset} if preset else {"contact": list(contact), "deal": list(deal)}),
            "crm_fields": crm_fields,
        },
        "matching": matching,
        "filters": {"branches": None, "doctors": None, "refused_processing": "skip", "skip_anonymous": True},
    }
    return Proposal(data, notes)


# --- check ---------------------------------------------------------------------------------------------


def check_stages(config: ClinicConfig, crm: CrmDiscovery) -> list[Problem]:
    problems = []
    for role, pipeline in config.crm.pipelines.items():
        live = crm.pipeline(pipeline.category_id)
        if live is None:
            known = ", ".join(f"{p.id} «{p.name}»" for p in crm.pipelines)
            problems.append(
                Problem(
                    "stages",
                    f"pipeline {role!r}: {crm.kind} has no pipeline {pipeline.category_id}",
                    f"use one of: {known}",
                )
            )
            continue
        ids = {s.id: s for s in live.stages}
        for status, stage in sorted(pipeline.stages.items()):
            if stage not in ids:
                problems.append(
                    Problem(
                        "stages",
                        f"pipeline {role!r} maps {status.value} to stage {stage!r}, "
                        f"which pipeline {live.id} does not have",
                        f"use one of: {', '.join(f'{s.id} «{s.name}»' for s in live.stages)}",
                    )
                )
        for stage in pipeline.closed_stages:
            if stage in ids and ids[stage].semantics == "open":
                problems.append(
                    Problem(
                        "stages",
                        f"pipeline {role!r}: closed stage {stage!r} is an open stage in the CRM",
                        "remove it from closed_stages, or deals there will never move again",
                        "warning",
                    )
                )
    return problems


def check_fields(config: ClinicConfig, crm: CrmDiscovery) -> list[Problem]:
    """Every mapped field exists in the CRM, on its entity, with a type that holds the value as sent."""
    problems = []
    entity: Literal["contact", "deal"]
    for entity, wanted in (("contact", config.fields.contact), ("deal", config.fields.deal)):
        live = crm.field_keys(entity)
        setting = f"fields.crm_fields.{entity}"
        for name in _custom_fields(crm.kind, entity, wanted):
            key = _mapped_key(config, crm.kind, entity, name)
            if crm.kind == "bitrix24" and key not in live:
                problems.append(
                    Problem(
                        "fields",
                        f"{entity} field {key} (for {name}) does not exist in Bitrix24: its values would be dropped",
                        f"run `clinicsync check --create-fields`, or map it to an existing field in {setting}.{name}",
                    )
                )
                continue
            if crm.kind != "bitrix24" and not key.isdigit():
                problems.append(
                    Problem(
                        "fields",
                        f"{entity} field {name} has no amoCRM field id in {setting}",
                        f"create a {entity} field of type {' or '.join(accepted_types(crm.kind, name))} in amoCRM "
                        f"and set {setting}.{name}: {{id: <its id>, type: <its type>}}",
                    )
                )
                continue
            if key not in live:
                problems.append(
                    Problem(
                        "fields",
                        f"{entity} field {name}: amoCRM has no {entity} field {key}",
                        f"use one of: {', '.join(f'{f.key} «{f.name}» ({f.type})' for f in live.values())}",
                    )
                )
                continue
            problems += _type_problems(config, crm.kind, entity, name, live[key])
    return problems


def _type_problems(
    config: ClinicConfig, kind: str, entity: Literal["contact", "deal"], name: str, field: CrmField
) -> list[Problem]:
    """The live field's type must hold the canonical value, and the config must say that type."""
    setting = f"fields.crm_fields.{entity}.{name}"
    if not compatible(kind, name, field.type):
        return [
            Problem(
                "fields",
                f"{entity} field {name} goes to «{field.name}» ({field.key}), a {field.type} field, which cannot "
                f"hold a {kind_of(name)}: the CRM would refuse the patient",
                f"map {setting} to a field of type {' or '.join(accepted_types(kind, name))}",
            )
        ]
    mapped = config.fields.crm_field(entity, name)
    declared = (mapped.type if mapped else None) or default_type(kind, name)
    if declared != field.type:
        return [
            Problem(
                "fields",
                f"{entity} field {name}: the config sends it as {declared}, but «{field.name}» ({field.key}) is a "
                f"{field.type} field",
                f"set {setting}: {{id: {json.dumps(field.key)}, type: {field.type}}}",
            )
        ]
    return []


def webhook_url(kind: str, api_url: str, crm_secret: Mapping[str, Any]) -> str:
    base = api_url.rstrip("/")
    if kind == "amocrm":
        return f"{base}/webhooks/amocrm/{crm_secret.get('webhook_secret', '')}"
    return f"{base}/webhooks/bitrix24"


def check_webhooks(
    config: ClinicConfig, crm: CrmDiscovery, api_url: str | None, crm_secret: Mapping[str, Any]
) -> list[Problem]:
    events = BITRIX24_EVENTS if crm.kind == "bitrix24" else AMOCRM_EVENTS
    if api_url is None:
        return [
            Problem(
                "webhooks",
                "the stack's API URL is unknown, so webhook registration was not checked",
                "deploy first, or pass --api-url",
                "warning",
            )
        ]
    url = webhook_url(config.crm.kind, api_url, crm_secret)
    if crm.webhooks is None:
        return [
            Problem(
                "webhooks",
                "an incoming-webhook credential cannot list Bitrix24 event handlers",
                f"check in the portal that an outgoing webhook posts {', '.join(events)} "
                f"to {api_url.rstrip('/')}/webhooks/bitrix24",
                "warning",
            )
        ]
    registered = crm.webhooks.get(url)
    if registered is None:
        shown = url if crm.kind == "bitrix24" else url.rsplit("/", 1)[0] + "/<secret>"
        return [
            Problem(
                "webhooks",
                f"no {crm.kind} webhook posts to {shown}",
                "run `clinicsync deploy` (it registers them) or add it in the CRM",
            )
        ]
    missing = [e for e in events if e not in registered]
    if missing:
        return [
            Problem(
                "webhooks",
                f"the webhook lacks events: {', '.join(missing)}",
                "run `clinicsync deploy` again to re-register it",
            )
        ]
    return []


def probe_mis(source: MisSource, now: float | None = None) -> list[Problem]:
    """One read of the last day through the stack's own adapter (credentials, TLS, the API root); records
    it could not translate (unmapped statuses, missing fields) are reported, never guessed."""
    page = source.fetch_changes(source.resync_cursor(86400, now or time.time()))
    if page.rejected:
        return [
            Problem(
                "statuses",
                f"{page.rejected} record(s) of the last day could not be translated (an unmapped status?)",
                "map the MIS's statuses in mis.statuses (docs/statuses.md)",
            )
        ]
    return []


def check_statuses(config: ClinicConfig, mis: MisDiscovery) -> list[Problem]:
    table = {**DEFAULT_STATUSES.get(config.mis.kind, {}), **config.mis.statuses}
    return [
        Problem(
            "statuses",
            f"MIS status {raw!r} ({count} recent visits) maps to no canonical status: those visits would be rejected",
            f"add `{raw}: <booked|confirmed|arrived|completed|cancelled|no_show|rescheduled>` under mis.statuses",
        )
        for raw, count in sorted(mis.statuses.items())
        if raw not in table
    ]


def check_filters(config: ClinicConfig, mis: MisDiscovery) -> list[Problem]:
    problems = []
    for what, wanted, known in (
        ("branch", config.filters.branches, {b for b, _ in mis.branches}),
        ("doctor", config.filters.doctors, {d for d, _ in mis.doctors}),
    ):
        if wanted and known:
            problems += [
                Problem(
                    "mis",
                    f"filters name {what} {x!r}, which the MIS does not list",
                    f"use one of: {', '.join(sorted(known))}",
                )
                for x in sorted(wanted - known)
            ]
    return problems


def guarded(
    area: Literal["credentials", "mis"], what: str, step: str, run: Callable[[], Any]
) -> tuple[Any, list[Problem]]:
    """Run one connection; a failure becomes a problem (the check goes on with the other system)."""
    try:
        return run(), []
    except Exception as exc:  # every failure is reported, with what to do next
        detail = str(exc) or type(exc).__name__
        return None, [Problem(area, f"{what}: {type(exc).__name__}: {detail[:300]}", step)]


def create_bitrix24_fields(client: Bitrix24Client, config: ClinicConfig, crm: CrmDiscovery) -> list[str]:
    """Create the UF_CRM_* fields the config writes and the portal lacks; returns their names."""
    created = []
    entity: Literal["contact", "deal"]
    for entity, wanted in (("contact", config.fields.contact), ("deal", config.fields.deal)):
        live = crm.field_keys(entity)
        for name in _custom_fields("bitrix24", entity, wanted):
            key = _mapped_key(config, "bitrix24", entity, name)
            if key in live:
                continue
            mapped = config.fields.crm_field(entity, name)
            kind = (mapped.type if mapped else None) or default_type("bitrix24", name)
            client.call(
                f"crm.{entity}.userfield.add",
                {
                    "fields": {
                        "FIELD_NAME": key.removeprefix("UF_CRM_"),
                        "USER_TYPE_ID": kind,
                        "EDIT_FORM_LABEL": f"clinicsync: {name}",
                        "LIST_COLUMN_LABEL": f"clinicsync: {name}",
                    }
                },
                writes=True,
            )
            created.append(key)
    return created


def register_webhooks(
    client: Bitrix24Client | AmoCrmClient, kind: str, api_url: str, crm_secret: Mapping[str, Any]
) -> str:
    """Register the stack's webhook where the CRM's API allows it; returns what was done."""
    url = webhook_url(kind, api_url, crm_secret)
    if isinstance(client, AmoCrmClient):
        client.request("POST", "/api/v4/webhooks", json={"destination": url, "settings": list(AMOCRM_EVENTS)})
        return f"amoCRM webhook registered for {', '.join(AMOCRM_EVENTS)}"
    if not client.is_oauth:
        return (
            "Bitrix24 incoming webhooks cannot bind events: add an outgoing webhook in the portal posting "
            f"{', '.join(BITRIX24_EVENTS)} to {url}"
        )
    bound = {
        (str(b.get("event")).upper(), str(b.get("handler"))) for b in _rows(client.call("event.get").get("result"))
    }
    for event in BITRIX24_EVENTS:
        if (event, url) not in bound:
            client.call("event.bind", {"event": event, "handler": url}, writes=True)
    return f"Bitrix24 events bound: {', '.join(BITRIX24_EVENTS)}"


def event_names(kind: str) -> tuple[str, ...]:
    return BITRIX24_EVENTS if kind == "bitrix24" else AMOCRM_EVENTS
