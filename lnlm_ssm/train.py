"""``python -m lnlm_ssm.train [flags]``: ``lnlm-ssm train`` as a module, the form torchrun launches::

    torchrun --nproc-per-node 2 -m lnlm_ssm.train --distributed ddp --preset mamba-tiny --steps 100 --out runs/ddp
"""

import sys
from typing import Optional, Sequence

from lnlm_ssm.cli import main as _cli_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lnlm-ssm train`` with ``argv`` (default: the process's arguments); returns the exit status."""
    return _cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
