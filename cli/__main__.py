import sys

from pollinate.main import main

sys.exit(main())
