"""CRM clients behind one seam, ``CrmConnectionManager``, and one error hierarchy."""

from .base import CrmConnectionManager
from .dummy import DummyConnectionManager
from .errors import (
    CrmAuthError,
    CrmConfigError,
    CrmError,
    CrmLimitExceeded,
    CrmNotFound,
    CrmNotSupported,
    CrmRejected,
    CrmTransientError,
)
from .factory import crm_from_env
from .http import RetryPolicy
from .log import LoadReport, LogConnectionManager, load_log
from .nationbuilder import NationbuilderConnectionManager
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
