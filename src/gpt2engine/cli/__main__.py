"""`python -m gpt2engine.cli`: the `gpt2` command."""

import sys

from gpt2engine.cli import main

sys.exit(main())
