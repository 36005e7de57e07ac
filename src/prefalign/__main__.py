"""`python -m prefalign`: the `prefalign` command, for launchers that start modules
(`accelerate launch -m prefalign dpo ...`, `torchrun -m prefalign ...`)."""

import sys

from prefalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
