"""`megatron-hybrid convert-to-hf` as a script (see megatron_hybrid/convert/cli.py for options and examples).

python scripts/convert_mcore_to_hf.py --help
"""

import sys

from megatron_hybrid.convert.cli import main

if __name__ == "__main__":  # saving starts a spawn process: the guard is required
    sys.exit(main(["convert-to-hf", *sys.argv[1:]]))
