"""Test doubles for code that uses crm_states, as moto is for AWS: fake CRMs that are real HTTP servers
on 127.0.0.1, and a launcher for a MongoDB wire-protocol server process."""

from .mongo import MongoServer
from .nationbuilder import FakeNationbuilder
from .salesforce import FakeSalesforce
from .server import Fault, Faults, LoopbackServer

__all__ = ["FakeSalesforce", "FakeNationbuilder", "MongoServer", "LoopbackServer", "Fault", "Faults"]
