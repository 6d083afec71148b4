"""``clinicsync fleet``: many clinics' stacks deployed, upgraded and watched as one (docs/fleet.md)."""
