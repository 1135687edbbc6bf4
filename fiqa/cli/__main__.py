"""`python -m fiqa.cli`: what Ray jobs run (through `fiqa.cluster.job_launcher`)."""

import sys

from fiqa.cli import main

sys.exit(main())
