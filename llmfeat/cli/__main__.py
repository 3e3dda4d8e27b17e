"""`python -m llmfeat.cli`: the same as the `llmfeat` command."""

import sys

from llmfeat.cli import main

sys.exit(main())
