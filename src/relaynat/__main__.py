"""`python -m relaynat`: the same as the `relaynat` command."""

import sys

from relaynat.cli import main

sys.exit(main())
