"""Use cases: poll, sync, CRM events, consent, backfill, the lab directory, IDENT."""
