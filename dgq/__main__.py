import sys

from dgq.cli import main

sys.exit(main())
