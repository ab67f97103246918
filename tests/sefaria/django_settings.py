"""The Django settings of the tests' minimal Sefaria: auth_user in SQLite, Sefaria's CRM and MongoDB
settings by their names (the fixtures point them at FakeSalesforce and the test database)."""

import os

SECRET_KEY = "tests-only-not-a-secret"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["CRM_STATES_TEST_SQLITE"],
                         "OPTIONS": {"timeout": 30}}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None  # leave the test run's logging alone
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast; tests only

# Sefaria's local_settings.py names (sefaria/local_settings_example.py); the fixtures override them.
CRM_TYPE = "NONE"
SALESFORCE_BASE_URL = ""
SALESFORCE_CLIENT_ID = ""
SALESFORCE_CLIENT_SECRET = ""
NATIONBUILDER_SLUG = ""
NATIONBUILDER_TOKEN = ""
NATIONBUILDER_CLIENT_ID = ""
NATIONBUILDER_CLIENT_SECRET = ""
MONGO_REPLICASET_NAME = None
MONGO_HOST = "localhost"
MONGO_PORT = 27017
SEFARIA_DB = "sefaria"
SEFARIA_DB_USER = ""
SEFARIA_DB_PASSWORD = ""
