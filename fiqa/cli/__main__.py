"""`python -m fiqa.cli`: the entrypoint Ray jobs run (see `fiqa.cluster.submit.entrypoint`)."""

import sys

from fiqa.cli import main

sys.exit(main())
