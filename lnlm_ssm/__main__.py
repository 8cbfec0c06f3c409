"""``python -m lnlm_ssm``: the ``lnlm-ssm`` command line."""

import sys

from lnlm_ssm.cli import main

sys.exit(main())
