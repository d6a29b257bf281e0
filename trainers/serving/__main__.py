import sys

from trainers.serving import main

sys.exit(main())
