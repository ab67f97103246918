"""Sefaria's ``sefaria/helper/crm/salesforce.py``, reduced to the one name its views import from it."""


class SalesforceNewsletterListRetrievalError(Exception):
    pass
