"""``ProfileWrite.unset`` and ``ProfileWrite.expect``: the compare-and-set the migration's writes rely on,
against SecantusDB. A write lands while each expected field holds the value read or already the value
written (so writing it again after a crash is a no-op), never over a value someone else wrote."""

from __future__ import annotations

import datetime as dt

from bson.int64 import Int64

from crm_states.records import ProfileData, ProfileWrite
from crm_states.store.profile_writes import (
    ABSENT,
    CHANGED,
    WRITTEN,
    PlannedWrite,
    apply_writes,
    condition_of,
)

AT = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


def apply(db, pid: int, write: ProfileWrite) -> str:
    return apply_writes(db.profiles, [PlannedWrite(pid, write)])[0]


def test_a_guarded_removal_lands_once_and_never_over_another_value(db) -> None:
    db.profiles.insert_many([{"id": 1, "nationbuilder_id": 7, "sf_app_user_id": "a0X1"},
                             {"id": 2, "nationbuilder_id": 8, "sf_app_user_id": "a0X2"},
                             {"id": 3, "nationbuilder_id": "7", "sf_app_user_id": "a0X1"}])
    remove = ProfileWrite(set={"sf_app_user_id": "a0X1"}, unset=("nationbuilder_id",),
                          expect={"nationbuilder_id": 7, "sf_app_user_id": "a0X1"}, requires_profile=True)
    assert condition_of(remove) == {"nationbuilder_id": {"$in": [7, None]}, "sf_app_user_id": "a0X1"}
    assert apply(db, 1, remove) == WRITTEN
    assert db.profiles.find_one({"id": 1}, {"_id": 0}) == {"id": 1, "sf_app_user_id": "a0X1"}
    assert apply(db, 1, remove) == WRITTEN  # again, after a crash: a no-op, not a refusal
    assert apply(db, 2, remove) == CHANGED  # another id, another App User: untouched
    assert apply(db, 3, remove) == CHANGED  # "7" is not 7
    assert apply(db, 4, remove) == ABSENT
    assert db.profiles.count_documents({"nationbuilder_id": {"$exists": True}}) == 2


def test_a_set_under_expect_never_overwrites_and_is_idempotent(db) -> None:
    db.profiles.insert_many([{"id": 1}, {"id": 2, "sf_app_user_id": "pending:e1"}, {"id": 3, "sf_app_user_id": "a0Y"}])
    give = ProfileWrite(set={"sf_app_user_id": "a0X"}, expect={"sf_app_user_id": None, "nationbuilder_id": None})
    assert apply(db, 1, give) == WRITTEN and apply(db, 1, give) == WRITTEN
    assert apply(db, 3, give) == CHANGED and db.profiles.find_one({"id": 3})["sf_app_user_id"] == "a0Y"
    over_placeholder = ProfileWrite(set={"sf_app_user_id": "a0Z"}, expect={"sf_app_user_id": "pending:e1"})
    assert apply(db, 2, over_placeholder) == WRITTEN and apply(db, 2, over_placeholder) == WRITTEN
    assert [p.get("sf_app_user_id") for p in db.profiles.find({}, {"sf_app_user_id": 1}).sort("id", 1)] == [
        "a0X", "a0Z", "a0Y"]


def test_a_restore_keeps_the_bson_type(db) -> None:
    db.profiles.insert_one({"id": 1})
    restore = ProfileWrite(set={"nationbuilder_id": Int64(5)}, expect={"nationbuilder_id": None})
    assert apply(db, 1, restore) == WRITTEN
    assert type(db.profiles.find_one({"id": 1})["nationbuilder_id"]) is Int64


def test_the_data_forgets_a_removed_field_and_the_document_round_trips() -> None:
    restored = ProfileData().with_write(ProfileWrite(set={"nationbuilder_id": 7}, expect={"nationbuilder_id": None}), AT)
    assert restored.fields == {"nationbuilder_id": 7} and restored.guard == {}
    removed = restored.with_write(ProfileWrite(set={"sf_app_user_id": "a0X"}, unset=("nationbuilder_id",),
                                               expect={"nationbuilder_id": 7}), AT)
    assert removed.fields == {"sf_app_user_id": "a0X"} and set(removed.set_at) == {"sf_app_user_id"}
    assert removed.removed == {"nationbuilder_id": 7} and ProfileData.from_doc(removed.to_doc()) == removed
    assert removed.with_write(ProfileWrite(set={"nationbuilder_id": 7}), AT).removed == {}  # restored: not removed
    write = ProfileWrite(unset=["nationbuilder_id"], expect={"nationbuilder_id": " 7 "}, requires_profile=True)
    assert ProfileWrite.from_doc(write.to_doc()) == write and not write.empty
    assert ProfileWrite(expect={"sf_app_user_id": None}).empty  # a precondition alone writes nothing


def test_writes_past_one_bulk_command_keep_each_profiles_own_result(db) -> None:
    """More writes than one bulk command takes (``BULK_OPS``): each item's result is still its own."""
    from crm_states.store.profile_writes import BULK_OPS

    n = BULK_OPS * 2 + 5
    held = {pid for pid in range(1, n + 1) if pid % 7 == 0}  # these already hold another App User
    absent = {pid for pid in range(1, n + 1) if pid % 11 == 0} - held
    db.profiles.insert_many([{"id": pid, **({"sf_app_user_id": "a0Yother"} if pid in held else {})}
                             for pid in range(1, n + 1) if pid not in absent])
    give = ProfileWrite(set={"sf_app_user_id": "a0X"}, expect={"sf_app_user_id": None}, requires_profile=True)
    results = apply_writes(db.profiles, [PlannedWrite(pid, give) for pid in range(1, n + 1)])
    expected = [CHANGED if pid in held else ABSENT if pid in absent else WRITTEN for pid in range(1, n + 1)]
    assert results == expected
    assert db.profiles.count_documents({"sf_app_user_id": "a0X"}) == n - len(held) - len(absent)
