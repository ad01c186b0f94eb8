import sys

from diffaug.cli import main

sys.exit(main())
