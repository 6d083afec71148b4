"""clinicsync's IDENT connector: runs at the clinic, reads IDENT's database, pushes signed change batches.

IDENT keeps appointments in a SQL Server database on the clinic's LAN, out of a cloud function's reach.
This small program reads the tables that matter (``Patients``, ``Persons``, ``ScheduledReceptions``,
``Receptions``, ``Staffs``) changed since its own cursor, turns the rows into clinicsync's canonical change
sets, drops what the clinic's filters exclude, and pushes the rest to the clinic's stack over HTTPS.
"""

__version__ = "0.1.0"
