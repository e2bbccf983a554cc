"""`python -m astrai.cli ...` runs the `astrai` command."""

import sys

from astrai.cli.main import main

sys.exit(main())
