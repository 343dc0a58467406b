"""``python -m data.recordio``: see :mod:`data.recordio`."""

import sys

from data.recordio import main

sys.exit(main())
