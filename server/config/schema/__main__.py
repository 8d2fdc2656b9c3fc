"""``python -m nextbest.config.schema [PATH]`` writes the apply file's JSON Schema (scripts/gen-schema)."""

import sys

from nextbest.config.schema import main

sys.exit(main())
