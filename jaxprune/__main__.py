import sys

from jaxprune.cli import main

sys.exit(main())
