import sys

from megatron_qrm.cli import main

if __name__ == "__main__":
    sys.exit(main())
