"""clinicsync: MIS <-> CRM sync for private clinics (the shared Lambda layer)."""

import os

# No model of ours uses a pydantic plugin, and none is installed; left enabled, the first model a cold start
# builds reads every installed distribution's entry points looking for one. Set before any model is built
# (each handler imports this package first); an explicit setting, e.g. an empty one, still wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
