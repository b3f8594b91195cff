"""``python -m vxnb`` is the ``vxnb`` command."""
import sys

from .cli import main

sys.exit(main())
