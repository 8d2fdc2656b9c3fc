"""``python -m server.schema [PATH]`` writes the apply file's JSON Schema (scripts/gen-schema)."""

import sys

from server.schema import main

sys.exit(main())
