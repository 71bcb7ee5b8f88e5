"""`python -m transformers_mhc ...` runs the `transformers-mhc` command line."""

import sys

from transformers_mhc_cli import main

sys.exit(main())
