"""A realistic, deterministic sample clinic shared by all MIS emulators.

The data is MIS-neutral: plain dataclasses with snake_case fields and a neutral status vocabulary
(:class:`VisitStatus`). Each emulator maps it onto its vendor's shapes and words (MEDODS: camelCase
JSON, ``serviced``/``canceled``/``failed`` ...), so the same patients show up in every sandbox.

What it deliberately contains, because real clinic data does and the sync must cope with it:

* Russian names with correct gender agreement (Иванов/Иванова, Сергеевич/Сергеевна);
* phones typed in mixed formats, some missing, some invalid, and families (a parent and children)
  sharing one phone while remaining distinct patients;
* e-mails for roughly 60 % of patients;
* refusal flags (``deny_*``), a few refusals of data processing, archived patients and anonymous
  visits: records the integration must never push to a CRM;
* about 10 % DMS (voluntary health insurance) visits: price 0.00 plus a policy number;
* visits spread over the past 60 and the next 30 days with a plausible status mix and repeat visits.

Determinism: the output depends only on ``seed`` and ``now`` (a private ``random.Random``; the global
RNG is never touched). With ``now=None`` the clinic is anchored to today's midnight, Moscow time, so
dates stay relative to the real calendar while repeated builds on one day are identical.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from typing import Literal

# Moscow has had no DST since 2014, so a fixed offset is exact and needs no tzdata.
CLINIC_TZ = timezone(timedelta(hours=3), "MSK")

Sex = Literal["male", "female"]


class VisitStatus(StrEnum):
    """Neutral life cycle of a visit; every MIS emulator maps these onto its own words."""

    PENDING = "pending"  # booked online, waiting for the front desk to approve
    BOOKED = "booked"
    CONFIRMED = "confirmed"  # the front desk called the patient and confirmed
    ARRIVED = "arrived"
    COMPLETED = "completed"
    BILLED = "billed"
    PAID = "paid"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"


@dataclass
class Branch:
    id: int
    title: str
    city: str
    address: str


@dataclass
class Doctor:
    id: int
    surname: str
    name: str
    patronymic: str
    sex: Sex
    specialty: str
    branch_ids: list[int]


@dataclass
class Patient:
    id: int
    surname: str
    name: str
    patronymic: str | None
    sex: Sex
    birthdate: date
    phone: str | None  # exactly as the front desk typed it
    email: str | None
    deny_calls: bool = False
    deny_email: bool = False
    deny_sms_notifications: bool = False
    deny_sms_dispatches: bool = False
    deny_whatsapp: bool = False
    deny_data_processing: bool = False
    archived: bool = False
    family_id: int | None = None  # patients sharing one phone share this id
    created_at: datetime = field(default_factory=lambda: datetime(2020, 1, 1, tzinfo=CLINIC_TZ))
    updated_at: datetime = field(default_factory=lambda: datetime(2020, 1, 1, tzinfo=CLINIC_TZ))

    @property
    def full_name(self) -> str:
        return " ".join(p for p in (self.surname, self.name, self.patronymic) if p)


@dataclass
class Appointment:
    id: int
    patient_id: int
    doctor_id: int
    branch_id: int
    start: datetime  # aware, clinic time zone
    duration_min: int
    status: VisitStatus
    kind: Literal["primary", "repeat"]
    source: Literal["phone", "website", "front_desk", "aggregator"]
    price: Decimal  # Decimal("0.00") for DMS visits
    insurance_policy: str | None  # set only for DMS visits
    anonymous: bool
    created_at: datetime
    updated_at: datetime

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.duration_min)


@dataclass
class SampleClinic:
    seed: int
    now: datetime
    branches: list[Branch]
    doctors: list[Doctor]
    patients: list[Patient]
    appointments: list[Appointment]

    def patient(self, patient_id: int) -> Patient:
        return next(p for p in self.patients if p.id == patient_id)

    def all_pii_strings(self) -> set[str]:
        """Every patient name, phone and e-mail, for scanning logs and stored items for leaks.

        Phones are given as typed and also as bare digits and ``+7`` E.164, because the sync
        normalises them and a leak would show the normalised form.
        """
        out: set[str] = set()
        for p in self.patients:
            out.update(s for s in (p.surname, p.name, p.patronymic, p.full_name, p.email) if s)
            if p.phone:
                out.add(p.phone)
                digits = re.sub(r"\D", "", p.phone)
                out.add(digits)
                if len(digits) == 11 and digits[0] in "78":
                    out.update({digits[1:], "+7" + digits[1:]})
                elif len(digits) == 10:
                    out.add("+7" + digits)
        # A mistyped short phone's bare digits ("+7 916 12" -> "791612") identify no one and turn up by
        # chance inside timestamps and versions; its typed form is still scanned for.
        return {s for s in out if not (s.isdigit() and len(s) < 10)}


# --- name material ---------------------------------------------------------------------------

# (male first name, patronymic for a son, patronymic for a daughter)
_MALE_NAMES: list[tuple[str, str, str]] = [
    ("Александр", "Александрович", "Александровна"),
    ("Сергей", "Сергеевич", "Сергеевна"),
    ("Дмитрий", "Дмитриевич", "Дмитриевна"),
    ("Андрей", "Андреевич", "Андреевна"),
    ("Алексей", "Алексеевич", "Алексеевна"),
    ("Иван", "Иванович", "Ивановна"),
    ("Михаил", "Михайлович", "Михайловна"),
    ("Николай", "Николаевич", "Николаевна"),
    ("Владимир", "Владимирович", "Владимировна"),
    ("Евгений", "Евгеньевич", "Евгеньевна"),
    ("Павел", "Павлович", "Павловна"),
    ("Олег", "Олегович", "Олеговна"),
    ("Игорь", "Игоревич", "Игоревна"),
    ("Виктор", "Викторович", "Викторовна"),
    ("Юрий", "Юрьевич", "Юрьевна"),
    ("Илья", "Ильич", "Ильинична"),
    ("Никита", "Никитич", "Никитична"),
    ("Константин", "Константинович", "Константиновна"),
    ("Роман", "Романович", "Романовна"),
    ("Максим", "Максимович", "Максимовна"),
    ("Артём", "Артёмович", "Артёмовна"),
    ("Григорий", "Григорьевич", "Григорьевна"),
    ("Анатолий", "Анатольевич", "Анатольевна"),
    ("Вадим", "Вадимович", "Вадимовна"),
    ("Тимур", "Тимурович", "Тимуровна"),
]

_FEMALE_NAMES: list[str] = [
    "Анна", "Мария", "Елена", "Ольга", "Наталья", "Татьяна", "Ирина", "Екатерина", "Светлана",
    "Юлия", "Анастасия", "Дарья", "Ксения", "Марина", "Виктория", "Алина", "Полина", "Софья",
    "Евгения", "Валентина", "Людмила", "Галина", "Надежда", "Вера", "Алёна", "Кристина",
]  # fmt: skip

# (male surname, female surname); the last few do not decline by gender.
_SURNAMES: list[tuple[str, str]] = [
    ("Иванов", "Иванова"), ("Смирнов", "Смирнова"), ("Кузнецов", "Кузнецова"),
    ("Попов", "Попова"), ("Васильев", "Васильева"), ("Петров", "Петрова"),
    ("Соколов", "Соколова"), ("Михайлов", "Михайлова"), ("Новиков", "Новикова"),
    ("Фёдоров", "Фёдорова"), ("Морозов", "Морозова"), ("Волков", "Волкова"),
    ("Алексеев", "Алексеева"), ("Лебедев", "Лебедева"), ("Семёнов", "Семёнова"),
    ("Егоров", "Егорова"), ("Павлов", "Павлова"), ("Козлов", "Козлова"),
    ("Степанов", "Степанова"), ("Николаев", "Николаева"), ("Орлов", "Орлова"),
    ("Андреев", "Андреева"), ("Макаров", "Макарова"), ("Никитин", "Никитина"),
    ("Захаров", "Захарова"), ("Зайцев", "Зайцева"), ("Соловьёв", "Соловьёва"),
    ("Борисов", "Борисова"), ("Ильин", "Ильина"), ("Гусев", "Гусева"),
    ("Титов", "Титова"), ("Белов", "Белова"), ("Комаров", "Комарова"),
    ("Киселёв", "Киселёва"), ("Голубев", "Голубева"), ("Виноградов", "Виноградова"),
    ("Богданов", "Богданова"), ("Воробьёв", "Воробьёва"), ("Тарасов", "Тарасова"),
    ("Жуков", "Жукова"), ("Баранов", "Баранова"), ("Калинин", "Калинина"),
    ("Ковалевский", "Ковалевская"), ("Вишневский", "Вишневская"), ("Достоевский", "Достоевская"),
    ("Толстой", "Толстая"), ("Шевченко", "Шевченко"), ("Ким", "Ким"), ("Бондаренко", "Бондаренко"),
]  # fmt: skip

_TRANSLIT = dict(
    zip(
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
        ["a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p", "r",
         "s", "t", "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya"],
        strict=True,
    )
)  # fmt: skip
_SOURCES: list[Literal["phone", "website", "front_desk", "aggregator"]] = [
    "phone", "phone", "phone", "website", "front_desk", "aggregator"
]  # fmt: skip
_MAIL_DOMAINS = ["mail.ru", "yandex.ru", "gmail.com", "bk.ru", "inbox.ru", "list.ru", "rambler.ru", "ya.ru"]
_MOBILE_CODES = ["903", "905", "906", "909", "915", "916", "917", "925", "926", "929", "965", "977", "985"]

_BRANCHES = [
    Branch(1, "Клиника на Тверской", "Москва", "ул. Тверская, д. 12, стр. 1"),
    Branch(2, "Клиника в Химках", "Химки", "Ленинградское ш., д. 5"),
]

# (surname, first name, patronymic, sex, specialty, branch ids, visit minutes, base price)
_DOCTORS: list[tuple[str, str, str, Sex, str, list[int], int, int]] = [
    ("Орлова", "Елена", "Викторовна", "female", "стоматолог-терапевт", [1], 60, 6500),
    ("Гусев", "Павел", "Андреевич", "male", "стоматолог-терапевт", [2], 60, 5900),
    ("Ким", "Алина", "Тимуровна", "female", "ортодонт", [1, 2], 45, 4500),
    ("Вишневский", "Игорь", "Олегович", "male", "стоматолог-хирург", [1], 60, 9000),
    ("Лебедева", "Ольга", "Сергеевна", "female", "гигиенист стоматологический", [1, 2], 60, 5500),
    ("Тарасов", "Максим", "Игоревич", "male", "стоматолог-ортопед", [1], 90, 12000),
    ("Соловьёва", "Дарья", "Павловна", "female", "детский стоматолог", [2], 45, 4000),
    ("Бондаренко", "Роман", "Юрьевич", "male", "пародонтолог", [1], 45, 5000),
]


# --- phone helpers ----------------------------------------------------------------------------


def _format_phone(national: str, style: int) -> str:
    """Render a 10-digit national number the way different front-desk staff type it."""
    a, b, c, d = national[:3], national[3:6], national[6:8], national[8:]
    return [
        f"+7 {a} {b}-{c}-{d}",
        f"8{national}",
        f"8 ({a}) {b}-{c}-{d}",
        f"+7{national}",
        national,
        f"7-{a}-{b}-{c}-{d}",
        f"+7 ({a}) {b} {c} {d}",
    ][style]


PHONE_STYLES = 7


def _translit(text: str) -> str:
    return "".join(_TRANSLIT.get(ch, ch) for ch in text.lower())


# --- builder ----------------------------------------------------------------------------------


class _Builder:
    def __init__(self, seed: int, now: datetime) -> None:
        self.rnd = random.Random(seed)
        self.now = now
        self.used_numbers: set[str] = set()
        self.used_emails: set[str] = set()

    def national_number(self) -> str:
        while True:
            num = self.rnd.choice(_MOBILE_CODES) + f"{self.rnd.randrange(10**7):07d}"
            if num not in self.used_numbers:
                self.used_numbers.add(num)
                return num

    def phone(self) -> str | None:
        roll = self.rnd.random()
        if roll < 0.03:
            return None
        if roll < 0.06:  # typos and city numbers without an area code
            return self.rnd.choice(
                [f"{self.rnd.randrange(100, 999)}-{self.rnd.randrange(10, 99)}-{self.rnd.randrange(10, 99)}",
                 "8" + self.national_number()[:6], "+7 916 12"]
            )  # fmt: skip
        return _format_phone(self.national_number(), self.rnd.randrange(PHONE_STYLES))

    def email(self, name: str, surname: str, birth_year: int) -> str:
        while True:
            first, last = _translit(name), _translit(surname)
            local = self.rnd.choice(
                [f"{first}.{last}", f"{last}{birth_year % 100:02d}", f"{first[0]}{last}",
                 f"{first}{self.rnd.randrange(1, 999)}"]
            )  # fmt: skip
            addr = f"{local}@{self.rnd.choice(_MAIL_DOMAINS)}"
            if addr not in self.used_emails:
                self.used_emails.add(addr)
                return addr

    def birthdate(self, min_age: int, max_age: int) -> date:
        today = self.now.date()
        days = self.rnd.randrange(min_age * 365, max_age * 365 + 1)
        return today - timedelta(days=days)

    def person(self, sex: Sex, surname_pair: tuple[str, str] | None = None) -> tuple[str, str, str]:
        surname_m, surname_f = surname_pair or self.rnd.choice(_SURNAMES)
        _, son, daughter = self.rnd.choice(_MALE_NAMES)
        if sex == "male":
            return surname_m, self.rnd.choice(_MALE_NAMES)[0], son
        return surname_f, self.rnd.choice(_FEMALE_NAMES), daughter

    def flags(self, p: Patient) -> None:
        roll = self.rnd.random()
        if roll < 0.04:  # refused any processing: must never reach the CRM
            p.deny_data_processing = True
            p.deny_calls = p.deny_email = p.deny_sms_dispatches = p.deny_whatsapp = True
        elif roll < 0.20:  # typical "no marketing" patterns
            p.deny_sms_dispatches = True
            p.deny_email = self.rnd.random() < 0.7
            p.deny_whatsapp = self.rnd.random() < 0.5
            p.deny_calls = self.rnd.random() < 0.2
            p.deny_sms_notifications = self.rnd.random() < 0.15
        p.archived = self.rnd.random() < 0.03

    def patients(self, count: int) -> list[Patient]:
        out: list[Patient] = []
        next_id = 10001
        family_id = 0
        while len(out) < count:
            # ~4.5 % of entries start a family: a parent plus 1-2 children on the parent's phone.
            if self.rnd.random() < 0.045 and count - len(out) >= 2:
                family_id += 1
                members = self.family(next_id, family_id, min(self.rnd.choice([2, 2, 3]), count - len(out)))
                out.extend(members)
                next_id += len(members)
                continue
            sex: Sex = "female" if self.rnd.random() < 0.58 else "male"
            surname, name, patronymic = self.person(sex)
            bd = self.birthdate(18, 85)
            p = Patient(
                next_id, surname, name, patronymic, sex, bd, self.phone(),
                self.email(name, surname, bd.year) if self.rnd.random() < 0.6 else None,
            )  # fmt: skip
            if self.rnd.random() < 0.02:  # some MIS cards have no patronymic filled in
                p.patronymic = None
            self.flags(p)
            out.append(p)
            next_id += 1
        return out

    def family(self, first_id: int, family_id: int, size: int) -> list[Patient]:
        pair = self.rnd.choice(_SURNAMES)
        father_name, son_patr, daughter_patr = self.rnd.choice(_MALE_NAMES)
        phone = _format_phone(self.national_number(), self.rnd.randrange(PHONE_STYLES))
        parent_sex: Sex = "female" if self.rnd.random() < 0.8 else "male"
        if parent_sex == "female":
            p_surname, p_name, p_patr = self.person("female", pair)
        else:  # the father is the parent who brings the kids
            p_surname, p_name, p_patr = pair[0], father_name, self.rnd.choice(_MALE_NAMES)[1]
        bd = self.birthdate(28, 50)
        parent = Patient(
            first_id, p_surname, p_name, p_patr, parent_sex, bd, phone,
            self.email(p_name, p_surname, bd.year) if self.rnd.random() < 0.7 else None,
            family_id=family_id,
        )  # fmt: skip
        self.flags(parent)
        parent.archived = False
        members = [parent]
        for i in range(1, size):
            sex: Sex = "male" if self.rnd.random() < 0.5 else "female"
            names = [n for n, _, _ in _MALE_NAMES] if sex == "male" else _FEMALE_NAMES
            child = Patient(
                first_id + i, pair[0] if sex == "male" else pair[1], self.rnd.choice(names),
                son_patr if sex == "male" else daughter_patr, sex, self.birthdate(3, 16),
                # children's cards often carry the parent's phone typed differently
                _format_phone(re.sub(r"\D", "", phone)[-10:], self.rnd.randrange(PHONE_STYLES)),
                None, family_id=family_id,
            )  # fmt: skip
            members.append(child)
        return members

    def appointments(self, count: int, patients: list[Patient], first_id: int = 500001) -> list[Appointment]:
        # A third of the patients are "regulars" and get most repeat visits.
        weights = [6.0 if self.rnd.random() < 0.33 else 1.0 for _ in patients]
        # Summed once: ``choices`` with ``weights`` sums them on every call (quadratic at 50,000 visits)
        # and draws exactly as it does with these ``cum_weights``.
        cumulative = list(itertools.accumulate(weights))
        busy: set[tuple[int, datetime]] = set()
        drafts: list[tuple[Patient, Doctor, int, datetime]] = []
        doctors = _doctors(rosters(count))
        while len(drafts) < count:
            patient = self.rnd.choices(patients, cum_weights=cumulative)[0]
            kids_doc = patient.birthdate > self.now.date() - timedelta(days=16 * 365)
            pool = [d for d in doctors if (d.specialty in ("детский стоматолог", "ортодонт")) == kids_doc]
            doctor = self.rnd.choice(pool)
            day = self.now.date() + timedelta(days=self.rnd.randrange(-60, 31))
            # Closed on Sundays; archived cards only have history.
            if day.weekday() == 6 or (patient.archived and day >= self.now.date()):
                continue
            minutes = self.rnd.randrange(9 * 60, 20 * 60, 15)
            start = datetime.combine(day, time(minutes // 60, minutes % 60), CLINIC_TZ)
            if (doctor.id, start) in busy:
                continue
            busy.add((doctor.id, start))
            drafts.append((patient, doctor, self.rnd.choice(doctor.branch_ids), start))

        drafts.sort(key=lambda d: d[3])
        seen: set[int] = set()
        out: list[Appointment] = []
        for i, (patient, doctor, branch_id, start) in enumerate(drafts):
            _, _, _, _, _, _, minutes, base_price = _doctor_row(doctor.id)
            dms = self.rnd.random() < 0.10
            lead_days = self.rnd.choice([0, 1, 1, 2, 3, 5, 7, 14, 21])
            lead = timedelta(days=lead_days, minutes=self.rnd.randrange(30, 600))
            created = min(start - lead, self.now - timedelta(minutes=5))
            status = self.status(start, minutes)
            updated = self.updated_at(created, start, minutes, status)
            cash = Decimal(base_price + 500 * self.rnd.randrange(0, 8))
            price = Decimal("0.00") if dms else cash.quantize(Decimal("0.01"))
            out.append(
                Appointment(
                    id=first_id + i,
                    patient_id=patient.id,
                    doctor_id=doctor.id,
                    branch_id=branch_id,
                    start=start,
                    duration_min=minutes,
                    status=status,
                    kind="repeat" if patient.id in seen else "primary",
                    source=self.rnd.choice(_SOURCES),
                    price=price,
                    insurance_policy=self.policy() if dms else None,
                    anonymous=self.rnd.random() < 0.02,
                    created_at=created,
                    updated_at=updated,
                )
            )
            seen.add(patient.id)
        return out

    def status(self, start: datetime, minutes: int) -> VisitStatus:
        roll = self.rnd.random()
        end = start + timedelta(minutes=minutes)
        if end <= self.now:
            table = [(0.42, VisitStatus.PAID), (0.62, VisitStatus.COMPLETED), (0.74, VisitStatus.BILLED),
                     (0.91, VisitStatus.CANCELLED), (1.0, VisitStatus.NO_SHOW)]  # fmt: skip
        elif start <= self.now:
            return VisitStatus.ARRIVED
        else:
            table = [(0.2, VisitStatus.PENDING), (0.62, VisitStatus.BOOKED), (0.92, VisitStatus.CONFIRMED),
                     (1.0, VisitStatus.CANCELLED)]  # fmt: skip
        return next(s for limit, s in table if roll < limit)

    def updated_at(self, created: datetime, start: datetime, minutes: int, status: VisitStatus) -> datetime:
        if status in (VisitStatus.PAID, VisitStatus.COMPLETED, VisitStatus.BILLED, VisitStatus.NO_SHOW):
            moment = start + timedelta(minutes=minutes + self.rnd.randrange(1, 90))
        elif status is VisitStatus.ARRIVED:
            moment = start - timedelta(minutes=self.rnd.randrange(0, 15))
        else:  # approved, confirmed or cancelled some time between booking and now
            span = max(int((min(start, self.now) - created).total_seconds()), 1)
            moment = created + timedelta(seconds=self.rnd.randrange(span))
        return max(created, min(moment, self.now - timedelta(seconds=1)))

    def policy(self) -> str:
        # Shapes seen on Russian DMS cards: insurer prefix + serial, or a plain long number.
        return self.rnd.choice(
            [f"{self.rnd.randrange(10, 99)}-{self.rnd.randrange(10**6):06d}/{self.rnd.randrange(10, 26)}",
             f"{self.rnd.randrange(10**15, 10**16)}",
             f"ДМС-{self.rnd.randrange(10**7):07d}"]
        )  # fmt: skip

    def timestamps(self, patients: list[Patient], appointments: list[Appointment]) -> None:
        first_booking: dict[int, datetime] = {}
        for a in appointments:
            first_booking[a.patient_id] = min(a.created_at, first_booking.get(a.patient_id, a.created_at))
        for p in patients:
            created = self.now - timedelta(days=self.rnd.randrange(1, 1500), minutes=self.rnd.randrange(1440))
            if p.id in first_booking:
                created = min(created, first_booking[p.id] - timedelta(minutes=self.rnd.randrange(1, 60)))
            p.created_at = created
            # Most cards were last touched long ago; some were edited during the last weeks.
            recent = self.rnd.random() < 0.25
            lo = max(created, self.now - timedelta(days=60)) if recent else created
            span = max(int((self.now - lo).total_seconds()) - 1, 1)
            p.updated_at = lo + timedelta(seconds=self.rnd.randrange(span))


# One roster of eight doctors has about 27,000 slots in the 90 days; at 10,000 visits it is a third
# full. A larger clinic has more doctors: the roster repeats (same specialties, branches, visit lengths
# and prices; new ids), so the mix of visits is the same at every size. Up to 10,000 visits (every size
# the tests, the demo and `make bench` use) the sample is exactly what it was with one roster.
ROSTER_VISITS = 10_000


def rosters(appointments: int) -> int:
    """How many copies of the doctors' roster a clinic with ``appointments`` visits has."""
    return max(1, math.ceil(appointments / ROSTER_VISITS))


def _doctor_row(doctor_id: int) -> tuple[str, str, str, Sex, str, list[int], int, int]:
    return _DOCTORS[(doctor_id - 11) % len(_DOCTORS)]


def _doctors(roster_count: int = 1) -> list[Doctor]:
    out = []
    for doc_id in range(11, 11 + roster_count * len(_DOCTORS)):
        surname, name, patr, sex, spec, branches, _, _ = _doctor_row(doc_id)
        out.append(Doctor(doc_id, surname, name, patr, sex, spec, list(branches)))
    return out


def build_sample_clinic(
    seed: int = 7, patients: int = 300, appointments: int = 400, now: datetime | None = None
) -> SampleClinic:
    """Build the sample clinic; the same ``seed`` and ``now`` always give the same data."""
    if now is None:
        now = datetime.now(CLINIC_TZ).replace(hour=0, minute=0, second=0, microsecond=0)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=CLINIC_TZ)
    now = now.astimezone(CLINIC_TZ)
    b = _Builder(seed, now)
    pats = b.patients(patients)
    appts = b.appointments(appointments, pats)
    b.timestamps(pats, appts)
    return SampleClinic(
        seed=seed,
        now=now,
        branches=[Branch(x.id, x.title, x.city, x.address) for x in _BRANCHES],
        doctors=_doctors(rosters(appointments)),
        patients=pats,
        appointments=appts,
    )
