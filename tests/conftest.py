"""Shared fixtures: a real MongoDB wire-protocol server (SecantusDB as a separate process, or the
MongoDB at CRM_STATES_TEST_MONGO_URL) and a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from crm_states.testing.mongo import MongoServer


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    url = os.environ.get("CRM_STATES_TEST_MONGO_URL")
    if url:
        yield url
        return
    with MongoServer(":memory:") as server:
        yield server.url


@pytest.fixture(scope="session")
def mongo_client(mongo_url: str) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client: MongoClient) -> Iterator[Database]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)
