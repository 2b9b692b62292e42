"""`python -m keras_rwkv`: the command line."""

import sys

from keras_rwkv.cli import main

sys.exit(main())
