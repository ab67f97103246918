"""A Salesforce org for the validation's three modes: NationBuilder ids on Contacts, App Users linked to
them (one, two, a refused one, one with an oversized email, none), and the report the operators export
from it, written from the fake's own records."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from crm_states.crm.checks import id18_suffix
from crm_states.crm.export import (APP_USER_ID, APP_USER_NAME, CONTACT_ID, EMAIL, FIRST_NAME, LAST_NAME,
                                   NATIONBUILDER_ID, SUSTAINER)
from crm_states.testing import FakeSalesforce

APP_USER, CONTACT, NB = "Sefaria_App_User__c", "Contact", "NationBuilder_Id__c"
ON_CONTACT = "Contact__r.NationBuilder_Id__c"
#: The settings that put the NationBuilder id on the Contact and check App User ids' prefix.
SCHEMA_ENV = {"SALESFORCE_NATIONBUILDER_ID_FIELD": ON_CONTACT, "SALESFORCE_APP_USER_KEY_PREFIX": "a0A"}
#: What each kind of profile ends in, whatever the mode.
EXPECTED = {"one": "WroteSalesforceAppUserUid", "two": "WroteUnexpectedResponse",
            "refused": "WroteUnexpectedResponse", "contact only": "WroteNotFound", "nothing": "WroteNotFound",
            "long email": "WroteSalesforceAppUserUid"}
KINDS = list(EXPECTED)
HEADER = [NATIONBUILDER_ID, CONTACT_ID, FIRST_NAME, LAST_NAME, APP_USER_NAME, APP_USER_ID, EMAIL, SUSTAINER]


def nb_id(pid: int) -> int:
    return 900_000 + pid


def kind_of(pid: int) -> str:
    return KINDS[pid % len(KINDS)]


def bad_id(n: int) -> str:
    """An 18-character App User id whose checksum suffix is wrong (a corrupted id)."""
    id15 = f"a0A{n:012d}"
    good = id18_suffix(id15)
    return id15 + ("AAA" if good != "AAA" else "BBB")


def seed_org(fake: FakeSalesforce, pids: range) -> dict[int, str]:
    """Contacts and App Users for ``pids`` by ``kind_of``; ``{profile id: app user id}`` of the clean ones."""
    clean = {}
    for pid in pids:
        kind = kind_of(pid)
        if kind == "nothing":
            continue
        contact = fake.insert(CONTACT, {NB: str(nb_id(pid)), "FirstName": "Ruth", "LastName": "O'Brien"})
        email = f"nb{pid}@example.org"
        if kind == "one":
            clean[pid] = fake.insert(APP_USER, {"Contact__c": contact, "Sefaria_App_Email__c": email})
        elif kind == "two":
            for n in (1, 2):
                fake.insert(APP_USER, {"Contact__c": contact, "Sefaria_App_Email__c": f"{n}.{email}"})
        elif kind == "refused":
            fake.insert(APP_USER, {"Contact__c": contact, "Sefaria_App_Email__c": email}, record_id=bad_id(pid))
        elif kind == "long email":
            clean[pid] = fake.insert(APP_USER, {"Contact__c": contact, "Sefaria_App_Email__c": "x" * 1500 + email})
    return clean


def write_export(fake: FakeSalesforce, path: Path) -> Path:
    """The operators' report of the fake's org: one line per App User with its Contact, one per Contact
    without an App User."""
    contacts: Mapping[str, dict] = {c["Id"]: c for c in fake.records(CONTACT)}
    linked = set()
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(HEADER)
        for user in fake.records(APP_USER):
            contact = contacts.get(user.get("Contact__c") or "", {})
            linked.add(contact.get("Id"))
            out.writerow([contact.get(NB, ""), contact.get("Id", ""), contact.get("FirstName", ""),
                          contact.get("LastName", ""), "SAU-1", user["Id"], user.get("Sefaria_App_Email__c", ""),
                          "Former"])
        for contact in contacts.values():
            if contact["Id"] not in linked:
                out.writerow([contact.get(NB, ""), contact["Id"], "", "", "", "", "", ""])
    return path


def seed_profiles(db, pids: range) -> None:
    db.profiles.insert_many([{"id": pid, "nationbuilder_id": nb_id(pid)} for pid in pids])
