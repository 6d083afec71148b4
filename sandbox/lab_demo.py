"""`make demo MIS=lis CRM=vtiger`: the lab case (clinic_cases.md §A) on this machine, step by step, each
step checked. Exits non-zero if any check fails."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def lab_demo(console: Console, mis: str, crm: str, log_path: Path, doctors: int = 40) -> int:
    if (mis, crm) != ("lis", "vtiger"):
        console.print("[red]The lab's LIS syncs with vTiger only:[/red] run `make demo MIS=lis CRM=vtiger`.")
        return 2
    from clinicsync.observability import logger
    from sandbox.lab import start_local_lab

    warnings.filterwarnings("ignore", message="No application metrics to publish")  # a poll with nothing to count
    log_file = log_path.open("w", encoding="utf-8")
    for handler in logger.handlers:
        handler.setStream(log_file)  # type: ignore[attr-defined]
    checks: list[tuple[str, bool]] = []

    def check(what: str, ok: bool) -> None:
        checks.append((what, ok))
        console.print(f"  {'[green]✓' if ok else '[red]✗'}[/] {what}")

    console.rule("[bold]clinicsync demo[/bold] — lab LIS ⇄ vTiger, → Mailchimp, local runtime on moto")
    with console.status("Starting moto, the LIS, vTiger and two Mailchimp audiences, and the lab's stack…"):
        lab = start_local_lab(doctors=doctors)
    try:
        with contextlib.redirect_stdout(log_file):  # handlers print JSON logs and EMF metrics, as on Lambda
            run = _Runner(lab)
            first = run.sync()
        doctors_n, orgs_n = len(lab.lis.all("doctor")), len(lab.lis.all("organisation"))
        table = Table(title="First sync", show_header=False)
        table.add_row("Doctors / organisations in the LIS", f"{doctors_n} / {orgs_n}")
        table.add_row(
            "vTiger Contacts / Accounts",
            f"{len(lab.vtiger.records('Contacts'))} / {len(lab.vtiger.records('Accounts'))}",
        )
        linked = sum(1 for c in lab.vtiger.records("Contacts") if c["account_id"])
        table.add_row("Contacts linked to their fund/clinic's Account", str(linked))
        table.add_row(
            "Mailchimp members: doctors / funds+clinics",
            f"{len(lab.doctors_audience.members())} / {len(lab.organisations_audience.members())}",
        )
        table.add_row("LIS 'do not send marketing' flags recorded as opt-outs", str(first["opt_outs_recorded"]))
        table.add_row("vTiger requests (incl. login)", str(run.crm_requests))
        console.print(table)
        check("every LIS record is in vTiger once", first["crm_created"] == doctors_n + orgs_n and not first["failed"])

        with contextlib.redirect_stdout(log_file):
            second = run.sync()
        console.print(f"Second sync (nothing changed): {run.crm_writes} vTiger writes, {run.lis_writes} LIS writes.")
        check("a second run writes nothing", run.crm_writes == 0 and run.lis_writes == 0 and not second["failed"])

        doctor = next(d for d in lab.lis.all("doctor") if d["email"] and not d["do_not_send_marketing"])
        contact = lab.crm_record("Contacts", doctor["id"])
        assert contact is not None
        console.print(f"\nA manager fixes doctor {doctor['id']}'s mobile in vTiger ({contact['id']})…")
        lab.vtiger.manager_update(contact["id"], mobile="+359 88 700 1234")
        with contextlib.redirect_stdout(log_file):
            run.sync()
        check("the phone reached the LIS", lab.lis.get("doctor", doctor["id"])["phone"] == "+359887001234")

        account = lab.crm_record("Accounts", doctor["organisation_id"])
        assert account is not None
        console.print("A manager adds a contact person at that clinic in vTiger (no LIS id)…")
        before = lab.lis.all("doctor")
        lab.vtiger.manager_create("Contacts", lastname="Петкова", firstname="Радост", account_id=account["id"])
        with contextlib.redirect_stdout(log_file):
            third = run.sync()
        check(
            "the contact person stayed out of the LIS",
            third["crm_only_ignored"] == 1 and lab.lis.all("doctor") == before,
        )

        console.print("The LIS and vTiger both change the doctor's city and phone before the next sync…")
        lab.lis.edit("doctor", doctor["id"], city="Пловдив", phone="0888 111 222")
        lab.vtiger.manager_update(contact["id"], mailingcity="Варна", mobile="0888 333 444")
        with contextlib.redirect_stdout(log_file):
            fourth = run.sync()
        row, crm_row = lab.lis.get("doctor", doctor["id"]), lab.vtiger.record(contact["id"]) or {}
        owners = lab.config.directory.field_owners if lab.config.directory else {}
        console.print(
            f"  field owners (config): {owners or 'the LIS for every field'}; conflicts resolved: {fourth['conflicts']}"
        )
        check(
            "city kept by the LIS, phone by vTiger, both sides equal",
            fourth["conflicts"] == 2
            and row["city"] == crm_row.get("mailingcity") == "Пловдив"
            and row["phone"] == "+359888333444",
        )

        console.print(f"Doctor {doctor['id']} clicks unsubscribe in a Mailchimp campaign…")
        lab.doctors_audience.member_unsubscribes(doctor["email"])
        with contextlib.redirect_stdout(log_file):
            lab.deliver_mailchimp()
            run.sync()
        flag = lab.lis.get("doctor", doctor["id"])["do_not_send_marketing"]
        optout = (lab.crm_record("Contacts", doctor["id"]) or {}).get("emailoptout")
        check(
            "the LIS 'do not send marketing' flag is ticked, and vTiger's e-mail opt-out",
            flag is True and optout == "1",
        )
    finally:
        lab.close()
        log_file.close()
    ok = all(passed for _, passed in checks)
    console.print(f"Handler logs: {log_path}")
    console.rule("[green]OK[/green]" if ok else "[red]FAILED[/red]")
    return 0 if ok else 1


class _Runner:
    """One scheduled poll at a time, with the vTiger and LIS writes it caused."""

    def __init__(self, lab: Any) -> None:
        self._lab = lab
        self.crm_requests = self.crm_writes = self.lis_writes = 0

    def sync(self) -> dict[str, Any]:
        vt, lis = self._lab.vtiger.stats(), self._lab.lis.stats()
        report: dict[str, Any] = self._lab.sync()
        vt2, lis2 = self._lab.vtiger.stats(), self._lab.lis.stats()
        self.crm_requests = vt2["requests"] - vt["requests"]
        self.crm_writes = vt2["writes"] - vt["writes"]
        self.lis_writes = lis2["writes"] - lis["writes"]
        return report
