"""`python -m peftkit ...` runs the `peftkit` command."""

import sys

from .cli.main import main

sys.exit(main())
