"""`python -m llmfeat`: the same as the `llmfeat` command."""

import sys

from llmfeat.cli import main

sys.exit(main())
