"""clinicsync: MIS <-> CRM sync for private clinics (the shared Lambda layer)."""
