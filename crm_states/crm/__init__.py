"""CRM clients behind one seam, ``CrmConnectionManager``, and one error hierarchy."""

from .base import CrmConnectionManager
from .errors import (
    CrmAuthError,
    CrmConfigError,
    CrmError,
    CrmLimitExceeded,
    CrmNotFound,
    CrmRejected,
    CrmTransientError,
)

__all__ = [
    "CrmConnectionManager",
    "CrmError",
    "CrmNotFound",
    "CrmTransientError",
    "CrmLimitExceeded",
    "CrmAuthError",
    "CrmRejected",
    "CrmConfigError",
]
