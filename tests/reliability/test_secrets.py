"""6. Secrets: with a sentinel client secret and the fake's issued access tokens, everything a run produced
is searched (captured logs and stderr, every document of every collection of every database, the journal,
CSV exports of ``crm-states report --csv``, the HTML page of ``--html`` and the text of ``--prometheus``
(run with a database URL whose password is a sentinel too), the library's metrics as scraped, its logs as
Sefaria's structlog setup renders them in JSON, the database server's log, exception messages). Salesforce
is made to echo the secret and the token back in its error bodies, so redaction is really exercised."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from bson import json_util
from prometheus_client import REGISTRY, generate_latest
from pymongo import MongoClient

from crm_states.api import CrmStates
from crm_states.crm import CrmError, RetryPolicy, SalesforceConnectionManager
from crm_states.crm.salesforce import TokenCache
from crm_states.testing import Fault, FakeSalesforce, MongoServer
from machines import nb_profile_validation as nb
from machines import new_user_signup as signup
from tests.operator_seed import json_logs
from tests.reliability.checks import cli, cli_env, record, seed_nb_profiles, seed_signup_profiles

HERE = Path(__file__).resolve().parent
SENTINEL = "SENTINEL-client-secret-0b5e3a7c91"
DB_SENTINEL = "SENTINEL-db-password-5f27c04e18"  # the password in the operator's MONGO_URL
FAST = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0, read_timeout=5.0)


def echo(message: str, code: str = "UNKNOWN_EXCEPTION") -> bytes:
    return json.dumps([{"errorCode": code, "message": message}]).encode()


def leaked(secret: str, text: str, window: int = 12) -> bool:
    """The secret, or any ``window`` characters of it (a truncated copy is a leak too), is in ``text``."""
    return any(secret[i:i + window] in text for i in range(max(1, len(secret) - window + 1)))


@pytest.fixture
def server(mongo_server_factory, tmp_path: Path) -> MongoServer:
    """A private server of the run's backend: its log is searched too, and the test sets a fail point."""
    return mongo_server_factory(tmp_path / "db", log_path=tmp_path / "server.log", test_commands=True)


def test_the_secret_and_the_access_tokens_appear_nowhere(server: MongoServer, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="pymongo")  # its DEBUG is every command and reply: our documents
    texts: dict[str, str] = {}
    errors: list[BaseException] = []
    client: MongoClient = MongoClient(server.url)
    db = client.secrets
    client.admin.command("createUser", "operator", pwd=DB_SENTINEL, roles=["root"])
    with FakeSalesforce(client_secret=SENTINEL, token_call_limit=7) as fake, json_logs(logging.DEBUG) as json_log:
        seed_nb_profiles(db, fake, 600)
        users = seed_signup_profiles(db, 30, first_id=100_001)
        journal = tmp_path / "journal.jsonl"
        env = cli_env(server.url, db.name, fake, journal)

        # The batch runner (INFO logs on stderr), tokens expiring every 7 calls, Salesforce echoing the
        # secret in a refused token request and in 500 answers past the retry budget, plus 503s and drops.
        fake.inject(Fault.error(400, body=json.dumps({"error": "invalid_client", "error_description":
                                                     f"client secret {SENTINEL} is not valid"}).encode()),
                    times=1, kind="token")
        fake.inject(Fault.error(500, body=echo(f"echo client_secret={SENTINEL} and {SENTINEL}")), times=4, kind="query")
        fake.inject(Fault.error(503), times=2, kind="query")
        fake.inject(Fault.drop(), times=1, kind="query")
        run = cli(env, "validate-nb", "-v", "--chunk-size", "100")
        texts["validate-nb"] = run.stdout + run.stderr
        assert run.returncode in (0, 1), texts["validate-nb"]

        # Signups: by command (one of them while the database refuses the id's write: journaled), and by
        # the driver script with 503s and a lost answer on the create.
        for uid in users[:3]:
            if uid == users[2]:
                client.admin.command({"configureFailPoint": "failCommand", "mode": {"skip": 1},
                                      "data": {"failCommands": ["update"], "errorCode": 6}})
            out = cli(env, "signup", "-v", "--user-id", str(uid))
            client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
            texts[f"signup {uid}"] = out.stdout + out.stderr
        assert "LoggedDbFailure" in texts[f"signup {users[2]}"] and journal.exists()
        fake.inject(Fault.error(503), times=2, kind="create")
        fake.inject(Fault.drop(processed=True), times=1, kind="create")
        fake.inject(Fault.error(400, body=echo(f"refused: {SENTINEL}", "INVALID_FIELD")), times=1, kind="create")
        driver = subprocess.run([sys.executable, str(HERE / "signup_driver.py"), str(users[3]), str(users[-1])],
                                env=env, capture_output=True, text=True, timeout=300)
        texts["signup driver"] = driver.stdout + driver.stderr
        assert driver.returncode == 0, texts["signup driver"]

        # In-process, Salesforce echoes the live access token (and the bearer header) in its errors.
        crm = SalesforceConnectionManager(fake.url, fake.client_id, SENTINEL, policy=FAST, sleep=lambda s: None,
                                          token_cache=TokenCache())
        app = CrmStates.open(db, crm, journal_path=str(journal))
        crm.find_crm_id("warm-up@example.org")
        token = fake.issued_tokens[-1]
        leak = f"session {token} / client secret {SENTINEL}"  # whole (under the 200-character cut: see below)
        fake.inject(Fault.error(503, body=echo(f"busy: {leak}")), times=1, kind="query")  # retried: a JSON log line
        fake.inject(Fault.error(400, body=echo(leak, "INVALID_QUERY_FILTER_OPERATOR")), times=1, kind="query")
        extra = seed_nb_profiles(db, fake, 20, first_id=50_001)
        results = app.validate_profiles(list(db.profiles.find({"id": {"$gte": 50_001, "$lt": 60_000}})))
        fake.inject(Fault.error(400, body=echo(f"Authorization: Bearer {token}", "INVALID_FIELD")), times=1, kind="create")
        seed_signup_profiles(db, 1, first_id=200_001)
        results.append(app.run_signup(200_001))
        fake.inject(Fault.error(400, body=echo(leak)), times=1)
        with pytest.raises(CrmError) as caught:
            crm.change_user_email("a0A000000000001EAA", "x@example.org")
        errors.append(caught.value)
        wrong = SENTINEL + "-wrong"  # a client whose secret is refused, echoed back by the token endpoint
        fake.inject(Fault.error(400, body=json.dumps({"error": "invalid_client", "error_description":
                                                     f"unknown secret {wrong}"}).encode()), times=1, kind="token")
        with pytest.raises(CrmError) as caught:
            SalesforceConnectionManager(fake.url, fake.client_id, wrong, policy=FAST,
                                        token_cache=TokenCache()).find_crm_id("x@example.org")
        errors.append(caught.value)
        texts["run results"] = "\n".join(str(r) for r in results)
        assert {r.state for r in results} == {"WroteUnexpectedResponse", "WroteSalesforceErrorToDb"}
        assert len(extra) and len(errors) == 2

        # The operator's commands on what the runs left.
        for args in (("replay", str(journal)), ("resume", "--machine", signup.NAME, "--state", "LoggedDbFailure"),
                     ("resume", "--machine", nb.NAME, "--state", "WroteUnexpectedResponse"),
                     ("report",), ("report", "--json"), ("report", "--machine", nb.NAME, "--mermaid")):
            out = cli(env, *args)
            texts[" ".join(args)] = out.stdout + out.stderr
            assert out.returncode in (0, 1), texts[" ".join(args)]
        # The operator's view, from a URL that carries a user name and a password.
        with_password = {**env, "MONGO_URL": server.url.replace("mongodb://", f"mongodb://operator:{DB_SENTINEL}@")}
        page = tmp_path / "report.html"
        for args in (("report", "--html", str(page)), ("report", "--prometheus")):
            out = cli(with_password, *args)
            texts[" ".join(args)] = out.stdout + out.stderr
            assert out.returncode == 0, texts[" ".join(args)]
        texts["report.html"] = page.read_text(encoding="utf-8")
        assert "crm_states_profiles{" in texts["report --prometheus"] and "<svg" in texts["report.html"]
        report = json.loads(cli(env, "report", "--json").stdout)
        for machine, states in report.items():
            for state, row in states.items():
                if row["count"]:
                    path = tmp_path / f"{machine}.{state}.csv"
                    out = cli(env, "report", "--machine", machine, "--state", state, "--csv", str(path))
                    assert out.returncode == 0, out.stderr
                    texts[path.name] = path.read_text(encoding="utf-8")
        tokens = list(fake.issued_tokens)
        client_id = fake.client_id

    # Everything: captured logs, files, and every document of every collection of every database.
    texts["caplog"] = caplog.text
    texts["json logs"] = json_log.getvalue()
    texts["metrics"] = generate_latest(REGISTRY).decode("utf-8")
    texts["journal"] = journal.read_text(encoding="utf-8")
    texts["server log"] = (tmp_path / "server.log").read_text(encoding="utf-8", errors="replace")
    texts["exceptions"] = "\n".join(f"{e}\n{e!r}\n{e.args!r}" for e in errors)
    documents = 0
    client_dbs = client.list_database_names()
    for name in client_dbs:
        for collection in client[name].list_collection_names():
            for doc in client[name][collection].find():  # the oplog (local.oplog.rs) included
                texts[f"mongo {name}.{collection} #{documents}"] = json_util.dumps(doc, ensure_ascii=False)
                documents += 1
    client.close()
    secrets = [SENTINEL, DB_SENTINEL, base64.b64encode(f"{client_id}:{SENTINEL}".encode()).decode(),
               *(t.split("!", 1)[1] for t in tokens)]  # a token is "<org id>!<secret part>"
    leaks = [(where, secret[:8] + "...") for where, text in texts.items() for secret in secrets if leaked(secret, text)]
    assert not leaks, leaks[:10]

    # Not vacuous: the echoes did reach logs, states and exceptions, redacted.
    everything = "\n".join(texts.values())
    assert len(tokens) >= 3 and everything.count("***") >= 10
    assert "client secret *** is not valid" in everything and "echo client_secret=***" in everything
    assert "Bearer ***" in everything
    json_lines = [json.loads(line) for line in texts["json logs"].splitlines()]
    assert any(line.get("outcome") == "retried" and line.get("error_class") == "CrmTransientError" for line in json_lines)
    assert "crm_states_crm_requests_total{" in texts["metrics"]
    record("6 secrets", texts_searched=len(texts), mongo_databases=sorted(client_dbs), mongo_documents=documents,
           tokens_issued=len(tokens),
           csv_exports=sum(1 for k in texts if k.endswith(".csv")), journal_entries=texts["journal"].count("\n"),
           redactions_seen=everything.count("***"), leaks=0)


@pytest.mark.parametrize("where", ["lookup", "token"])
def test_a_secret_cut_by_the_200_character_limit_is_still_redacted(db, where: str) -> None:
    """Error messages are cut to 200 characters; a secret the cut splits must be redacted all the same."""
    with FakeSalesforce(client_secret=SENTINEL) as fake:
        db.profiles.insert_many([{"id": i, "nationbuilder_id": 800 + i} for i in range(1, 4)])
        crm = SalesforceConnectionManager(fake.url, fake.client_id, SENTINEL, policy=FAST, sleep=lambda s: None,
                                          token_cache=TokenCache())
        if where == "lookup":
            crm.find_crm_id("warm-up@example.org")
            token = fake.issued_tokens[-1]
            secret = token.split("!", 1)[1]
            fake.inject(Fault.error(400, body=echo("x" * 120 + f" {token} " + "z" * 200, "INVALID_FIELD")), times=1, kind="query")
        else:
            secret = SENTINEL
            fake.inject(Fault.error(400, body=json.dumps({"error": "invalid_client", "error_description":
                                                         "y" * 170 + f" {SENTINEL} " + "z" * 200}).encode()), times=1, kind="token")
        results = CrmStates.open(db, crm).validate_profiles(list(db.profiles.find()))
    assert {r.state for r in results} == {"WroteUnexpectedResponse"}
    stored = json_util.dumps(list(db.profiles.find()) + list(db.crm_positions.find()), ensure_ascii=False)
    assert "…" in stored  # the message was cut
    assert not leaked(secret, stored), [line for p in db.profiles.find() for line in p["CrmLog"]][0][-120:]


def test_the_sefaria_drop_in_leaks_no_secret(server: MongoServer, tmp_path: Path, caplog) -> None:
    """Sefaria's call sites through ``crm_states.sefaria`` with Django's settings: the client secret and a
    MongoDB password (``SEFARIA_DB_PASSWORD``) as sentinels, Salesforce echoing the secret and its tokens in
    error bodies at every call site, a wrong database password and a bad ``MONGO_PORT``: the call sites'
    logs and replies, the library's logs (plain and JSON), the exceptions and every stored document are
    searched."""
    from django.test import override_settings

    from crm_states.sefaria import CrmMediator
    from crm_states.sefaria.aftercare import AFTERCARE
    from tests.sefaria.project import setup_django

    setup_django(tmp_path)
    from tests.sefaria.sefaria_site import Sefaria

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="pymongo")
    client: MongoClient = MongoClient(server.url)
    client.admin.command("createUser", "sefaria", pwd=DB_SENTINEL, roles=["root"])
    texts: dict[str, str] = {}
    errors: list[BaseException] = []
    with FakeSalesforce(client_secret=SENTINEL, token_call_limit=5) as fake, json_logs(logging.DEBUG) as json_log:
        mongo = {"MONGO_HOST": "127.0.0.1", "MONGO_PORT": server.port, "SEFARIA_DB": "sefaria_secrets",
                 "SEFARIA_DB_USER": "sefaria", "SEFARIA_DB_PASSWORD": DB_SENTINEL, "MONGO_REPLICASET_NAME": None}
        crm = {"CRM_TYPE": "SALESFORCE", "SALESFORCE_BASE_URL": fake.url, "SALESFORCE_CLIENT_ID": fake.client_id,
               "SALESFORCE_CLIENT_SECRET": SENTINEL, "CRM_STATES_AFTERCARE_SECONDS": "0.3,0.8"}
        with override_settings(**mongo, **crm):
            sefaria = Sefaria(client.sefaria_secrets)
            sefaria.User.objects.all().delete()
            sefaria.process_register_form("first@example.org", "First", "User")
            token = fake.issued_tokens[-1]
            leak = f"session {token} / client secret {SENTINEL}"
            fake.inject(Fault.error(400, body=echo(leak, "INVALID_FIELD")), times=1, kind="create")
            sefaria.process_register_form("refused@example.org", "Refused", "User")
            uid = sefaria.sso_save_user("sso@example.org", "S", "O")
            fake.inject(Fault.error(400, body=echo(f"Authorization: Bearer {token}")), times=1, kind="update")
            texts["account update"] = str(sefaria.account_user_update(sefaria.User.objects.get(id=uid), "n@example.org"))
            fake.inject(Fault.error(400, body=echo(leak)), times=1, kind="create")
            texts["subscribe"] = str(sefaria.subscribe_to_newsletter_api("sub@example.org", {"firstName": "A",
                                                                                             "lastName": "B"}))
            fake.inject(Fault.error(400, body=echo(leak, "INVALID_QUERY_FILTER_OPERATOR")), times=1, kind="query")
            texts["lists"] = str(sefaria.get_available_newsletter_mailing_lists())
            fake.inject(Fault.error(400, body=echo(leak)), times=1, kind="update")
            sefaria.purge_spammer_account_data(uid)
            fake.inject(Fault.error(400, body=echo(leak, "INVALID_QUERY_FILTER_OPERATOR")), times=1, kind="query")
            try:
                sefaria.nation_builder_sync()
            except Exception as exc:  # the cron job fails visibly: its message is searched too
                errors.append(exc)
            assert AFTERCARE.wait_idle(30)
        with override_settings(**{**mongo, "SEFARIA_DB_PASSWORD": DB_SENTINEL + "-wrong"}, **crm):
            texts["wrong password subscribe"] = str(sefaria.subscribe_to_newsletter_api(
                "w@example.org", {"firstName": "W", "lastName": "P"}))
            sefaria.sso_save_user("wrong@example.org", "W", "P")
        with override_settings(**{**mongo, "MONGO_PORT": "not-a-port"}, **crm):
            with pytest.raises(ValueError, match="MONGO_PORT") as caught:
                CrmMediator()
            errors.append(caught.value)
        tokens = list(fake.issued_tokens)
    texts["call sites logged"] = "\n".join(f"{level}: {message}" for level, message in sefaria.logged)
    texts["caplog"] = caplog.text
    texts["json logs"] = json_log.getvalue()
    texts["exceptions"] = "\n".join(f"{e}\n{e!r}\n{e.args!r}" for e in errors)
    documents = 0
    for name in client.list_database_names():
        for collection in client[name].list_collection_names():
            for doc in client[name][collection].find():
                texts[f"mongo {name}.{collection} #{documents}"] = json_util.dumps(doc, ensure_ascii=False)
                documents += 1
    client.close()
    secrets = [SENTINEL, DB_SENTINEL, *(t.split("!", 1)[1] for t in tokens)]
    leaks = [(where, secret[:8] + "...") for where, text in texts.items() for secret in secrets if leaked(secret, text)]
    assert not leaks, leaks[:10]
    # Not vacuous: the echoes reached the records (redacted), the failures were logged, the sync failed.
    everything = "\n".join(texts.values())
    assert everything.count("***") >= 5 and "502" in texts["lists"] and len(errors) == 2
    assert "authentication failed" in everything.lower() and "MONGO_PORT" in texts["exceptions"] and tokens
    record("6 secrets (Sefaria drop-in)", texts_searched=len(texts), mongo_documents=documents,
           tokens_issued=len(tokens), redactions_seen=everything.count("***"), leaks=0)
