"""``python -m backdoor_gate``: the same as the ``backdoor-gate`` command."""

import sys

from backdoor_gate.cli import main

sys.exit(main())
