"""Training entry point: `accelerate launch train.py --config configs/<name>.yaml [section.key=value ...]`.

Also runs as `python train.py ...`; `ldm-tune train ...` is the same code.
"""

import sys

from ldm_tune.cli import main


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
