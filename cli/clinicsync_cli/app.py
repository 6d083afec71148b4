"""The ``clinicsync`` command. Every error says what to do next."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clinicsync.dlq import dead_letters, replay
from clinicsync_cli.stack import QUEUES, StackHandle, StackNotFound

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Operate a clinic's clinicsync stack")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: why messages failed, and replaying them")
app.add_typer(dlq_app, name="dlq")
console = Console()

StackOption = Annotated[str, typer.Option("--stack", "-s", help="The clinic's CloudFormation stack name")]
QueueOption = Annotated[str, typer.Option("--queue", "-q", help=f"Which queue: {', '.join(QUEUES)}")]


def _stack(name: str) -> StackHandle:
    try:
        return StackHandle.find(name)
    except StackNotFound as exc:
        console.print(f"[red]error:[/] {exc}")
        console.print("[yellow]next:[/] check the stack name (`aws cloudformation list-stacks`) and the region")
        raise typer.Exit(1) from None


def _queue(queue: str) -> str:
    if queue not in QUEUES:
        console.print(f"[red]error:[/] unknown queue {queue!r}; [yellow]next:[/] use one of {', '.join(QUEUES)}")
        raise typer.Exit(2)
    return queue


@dlq_app.command("list")
def dlq_list(stack: StackOption, queue: QueueOption = "sync") -> None:
    """Every dead letter with the reason its last attempt failed (ids and counts only, never PII)."""
    handle = _stack(stack)
    _source, dlq = handle.queue_urls(_queue(queue))
    letters = dead_letters(handle.sqs(), dlq, handle.failure_log(), queue)
    if not letters:
        console.print(f"[green]no dead letters in {queue}[/]")
        return
    table = Table(title=f"{stack}: {len(letters)} dead letter(s) in {queue}")
    for column in ("message", "sent", "receives", "about", "reason"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        about = ", ".join(f"{k} {v}" for k, v in letter.summary().items() if k != "kind")
        sent = datetime.fromtimestamp(letter.sent_at, UTC).strftime("%Y-%m-%d %H:%M") if letter.sent_at else "?"
        table.add_row(letter.message_id, sent, str(letter.receives), about, letter.reason)
    console.print(table)
    console.print(f"[yellow]next:[/] fix the cause, then `clinicsync dlq replay --stack {stack} --queue {queue}`")


@dlq_app.command("replay")
def dlq_replay(stack: StackOption, queue: QueueOption = "sync") -> None:
    """Send every dead letter back to its queue (FIFO group kept), deleting each only after the send."""
    handle = _stack(stack)
    source, dlq = handle.queue_urls(_queue(queue))
    with console.status(f"replaying {queue} dead letters"):
        report = replay(handle.sqs(), dlq, source, handle.failure_log(), queue)
    console.print(f"replayed {report.replayed} message(s) to {queue}; {report.failed} could not be sent")
    if report.failed:
        console.print("[yellow]next:[/] check SQS permissions and run the replay again")
        raise typer.Exit(1)
