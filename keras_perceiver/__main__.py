import sys

from keras_perceiver.cli import main

sys.exit(main())
