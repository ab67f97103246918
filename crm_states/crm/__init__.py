"""CRM clients behind one seam, ``CrmConnectionManager``, and one error hierarchy."""

from .base import CrmConnectionManager
from .dummy import DummyConnectionManager
from .errors import (
    CrmAuthError,
    CrmBadAnswer,
    CrmBatchOutcomeUnknown,
    CrmConfigError,
    CrmError,
    CrmInvalidInput,
    CrmJobFailed,
    CrmLimitExceeded,
    CrmNotFound,
    CrmNotSupported,
    CrmOutcomeUnknown,
    CrmRejected,
    CrmTransientError,
)
from .factory import crm_from_env
from .http import RetryPolicy
from .log import LoadReport, LogConnectionManager, load_log
from .nationbuilder import NationbuilderConnectionManager
from .results import Matches, NewAppUser, RecordError, RecordResult
from .salesforce import SalesforceConnectionManager, SalesforceSchema, soql_quote

__all__ = [
    "CrmConnectionManager",
    "CrmError",
    "CrmNotFound",
    "CrmTransientError",
    "CrmLimitExceeded",
    "CrmAuthError",
    "CrmRejected",
    "CrmConfigError",
    "CrmNotSupported",
    "CrmInvalidInput",
    "CrmBadAnswer",
    "CrmOutcomeUnknown",
    "CrmBatchOutcomeUnknown",
    "CrmJobFailed",
    "Matches",
    "NewAppUser",
    "RecordError",
    "RecordResult",
    "SalesforceConnectionManager",
    "SalesforceSchema",
    "NationbuilderConnectionManager",
    "LogConnectionManager",
    "DummyConnectionManager",
    "LoadReport",
    "load_log",
    "crm_from_env",
    "RetryPolicy",
    "soql_quote",
]
