"""`python -m relaynat`: the same as the `relaynat` command."""

import sys

from relaynat.cli.main import main

sys.exit(main())
