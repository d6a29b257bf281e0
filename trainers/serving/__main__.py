import sys

from trainflow.trainers.serving import main

sys.exit(main())
