"""``python -m crm_states.cli``: the same as the ``crm-states`` command."""

import sys

from . import main

sys.exit(main())
