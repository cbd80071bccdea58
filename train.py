"""Training entry point: `accelerate launch train.py --config configs/<name>.yaml [dotted.key=value ...]`.

The trainer itself lands with the trainer issue; until then this script says so instead of pretending to train.
"""

import sys


def main() -> int:
    print(
        "ldm_tune: the trainer is not built yet (see the trainer issue); `ldm-tune generate` works.", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
