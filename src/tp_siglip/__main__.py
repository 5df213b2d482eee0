"""``python -m tp_siglip``: the ``tp-siglip`` command (see `tp_siglip.cli`)."""

import sys

from tp_siglip.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m tp_siglip"))
