"""`megatron-hybrid export-peft` as a script (see megatron_hybrid/convert/cli.py for options and examples).

python scripts/export_peft.py --help
"""

import sys

from megatron_hybrid.convert.cli import main

if __name__ == "__main__":  # saving starts a spawn process: the guard is required
    sys.exit(main(["export-peft", *sys.argv[1:]]))
