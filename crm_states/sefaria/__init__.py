"""A drop-in for Sefaria's ``sefaria.helper.crm``: change one import and Sefaria's CRM calls run the machines.

    # from sefaria.helper.crm.crm_mediator import CrmMediator
    from crm_states.sefaria import CrmMediator

``mediator`` (the methods), ``signup`` (``create_crm_user`` after the signup's transaction commits),
``aftercare`` (the new user's id kept on the profile through Sefaria's stale saves), ``settings`` (Sefaria's
Django settings and MongoDB), ``users`` (emails to user ids through Django's user table).
"""

from .mediator import (
    CrmMediator,
    SalesforceNewsletterListRetrievalError,
    SpamMarking,
    SustainerSyncError,
)

__all__ = ["CrmMediator", "SalesforceNewsletterListRetrievalError", "SustainerSyncError", "SpamMarking"]
