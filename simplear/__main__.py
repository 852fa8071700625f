"""`python -m simplear run workflow.yaml`: the CLI, e.g. as a Ray job's entrypoint."""

import sys

from simplear.cli import main

sys.exit(main())
