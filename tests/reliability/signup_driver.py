"""Sign up users FIRST..LAST one after another, as Sefaria's signup hook does, through
``CrmStates.run_signup``; the reliability suite kills this process at random instants and runs it again.

    python tests/reliability/signup_driver.py FIRST LAST

Configuration comes from the environment like the ``crm-states`` command's (MONGO_URL, MONGO_DB,
CRM_TYPE=SALESFORCE and SALESFORCE_*, CRM_STATES_JOURNAL, CRM_STATES_CLAIM_SECONDS and _WAIT). A failed call (the database away, say) is
printed and the loop goes on, as a web request would fail alone; calling again later is safe. The last
line is a JSON summary: outcomes and states counted, and the users whose call raised.
"""

from __future__ import annotations

import json
import sys
from collections import Counter


def main(argv: list[str]) -> int:
    from crm_states.api import CrmStates

    first, last = int(argv[1]), int(argv[2])
    app = CrmStates.from_env()
    outcomes: Counter[str] = Counter()
    states: Counter[str] = Counter()
    raised: list[int] = []
    for user_id in range(first, last + 1):
        try:
            result = app.run_signup(user_id)
        except Exception as exc:  # what a signup hook would log; the next user is another request
            print(f"user {user_id}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            raised.append(user_id)
            continue
        outcomes[result.outcome] += 1
        states[str(result.state)] += 1
    print(json.dumps({"outcomes": outcomes, "states": states, "raised": raised}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
