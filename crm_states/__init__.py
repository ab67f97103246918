"""Persisted state machines for Sefaria's CRM integration."""
