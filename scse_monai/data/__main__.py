"""Entry point for ``python -m scse_monai.data``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
