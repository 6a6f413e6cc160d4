"""`megatron-hybrid convert-hf` as a script (see megatron_hybrid/convert/cli.py for options and examples).

python scripts/convert_hf_to_mcore.py --help
"""

import sys

from megatron_hybrid.convert.cli import main

if __name__ == "__main__":  # saving starts a spawn process: the guard is required
    sys.exit(main(["convert-hf", *sys.argv[1:]]))
